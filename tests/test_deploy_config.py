"""deploy.yaml: the shipped example parses, engine settings reach the engine, bad values are named."""

from __future__ import annotations

from pathlib import Path

import pytest

from moeserve.cluster.config import load_deploy_config, parse_deploy_config

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "deploy.yaml"


def test_example_deploy_yaml_parses_and_maps_to_the_engine(tmp_path):
    cfg = load_deploy_config(EXAMPLE, overrides={"model": str(tmp_path)})
    engine = cfg.engine_config(str(tmp_path))
    assert engine.attention_backend == cfg.engine.attention_backend == "auto"
    assert engine.expert_kernel == "auto"
    assert engine.enable_cuda_graphs and engine.cuda_graph_max_batch == cfg.engine.cuda_graph_max_batch


def test_engine_backends_reach_the_engine_config(tmp_path):
    data = {"model": str(tmp_path),
            "engine": {"attention_backend": "flashinfer", "expert_kernel": "triton", "warmup_kernels": False}}
    engine = parse_deploy_config(data).engine_config(str(tmp_path))
    assert (engine.attention_backend, engine.expert_kernel) == ("flashinfer", "triton")
    assert not engine.warmup_kernels


def test_unknown_attention_backend_is_named_with_the_choices(tmp_path):
    with pytest.raises(ValueError) as err:
        parse_deploy_config({"model": str(tmp_path), "engine": {"attention_backend": "flash"}})
    assert "attention_backend" in str(err.value) and "flashinfer" in str(err.value)
