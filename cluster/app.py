"""The Serve application: `Ingress` (the OpenAI HTTP API, N CPU replicas) in front of one `Controller` (the
worker group). `build_app` builds it for `serve run`, a Serve config file and `moeserve.cluster.launch` alike:

    serve run moeserve.cluster.app:build_app model=/models/Qwen3-30B-A3B parallel.dp=4 parallel.ep=4

    # Serve config file
    applications:
      - name: moeserve
        route_prefix: /
        import_path: moeserve.cluster.app:build_app
        args: {parallel: {dp: 2, ep: 2}, engine: {max_model_len: 4096}}

(With `serve run` / a Serve config, Serve's own HTTP options apply; `http:` is read by launch and the CLI.)
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application

from moeserve.cluster.config import DeployConfig, parse_deploy_config
from moeserve.cluster.controller import actor_options, controller_deployment
from moeserve.cluster.offline import resolve_model
from moeserve.cluster.openai_app import build_openai_app
from moeserve.cluster.serve_client import RayEngineClient
from moeserve.config import EngineConfig


@serve.ingress()
class Ingress:
    """One HTTP replica: the OpenAI app over a `RayEngineClient` (Serve builds it after the constructor)."""

    def __init__(self, controller: Any, config: DeployConfig) -> None:
        self.config = config
        self.client = RayEngineClient(controller, config)

    def __serve_build_asgi_app__(self):
        return build_openai_app(self.client, api_key=self.config.api_key)


def resolve_deploy_config(config: DeployConfig) -> DeployConfig:
    """The config every replica gets: model path pinned (the demo model is built here, once), device and API
    key decided here (see `DeployConfig.resolved`)."""
    return config.resolved(resolve_model(EngineConfig(model=config.model)).model)


def build_app(args: DeployConfig | dict[str, Any]) -> Application:
    """The moeserve Serve application. args: a DeployConfig, or its fields as a dict (nested or dotted keys,
    string values as `serve run key=value` passes them)."""
    config = args if isinstance(args, DeployConfig) else parse_deploy_config(dict(args), "application args")
    config = resolve_deploy_config(config)
    controller = controller_deployment(config).bind(config)
    ingress = serve.deployment(
        Ingress,
        name="Ingress",
        num_replicas=config.ingress.replicas,
        max_ongoing_requests=config.ingress.max_ongoing_requests,
        ray_actor_options=actor_options(config, num_cpus=config.ingress.num_cpus),
    )
    return ingress.bind(controller, config)
