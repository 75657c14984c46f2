"""Maps the repository's folders onto import packages: kernels/, eplb/ and cluster/ install as
moeserve.kernels, moeserve.eplb and moeserve.cluster (see docs/architecture.md)."""

from setuptools import find_packages, setup

ROOTS = {
    "moeserve": "moeserve",
    "moeserve.kernels": "kernels",
    "moeserve.eplb": "eplb",
    "moeserve.cluster": "cluster",
}

packages = []
for package, folder in ROOTS.items():
    packages += [package] + [f"{package}.{sub}" for sub in find_packages(folder)]

setup(packages=packages, package_dir=ROOTS)
