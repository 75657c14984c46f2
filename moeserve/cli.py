"""The `moeserve` command: generate (offline), serve (local Ray Serve), status, rebalance."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from moeserve.config import EngineConfig


def add_engine_args(p: argparse.ArgumentParser) -> None:
    d = EngineConfig()
    p.add_argument("--model", default=None, help="HF-layout checkpoint directory (default: the demo model)")
    p.add_argument("--dtype", default=d.dtype, help="auto | float32 | bfloat16 | float16")
    p.add_argument("--device", default=d.device, help="auto | cpu | cuda | cuda:N")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-batched-tokens", type=int, default=d.max_num_batched_tokens)
    p.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs)
    p.add_argument("--block-size", type=int, default=d.block_size)
    p.add_argument("--num-kv-blocks", type=int, default=None)
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--seed", type=int, default=d.seed)


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=args.model,
        dtype=args.dtype,
        device=args.device,
        max_model_len=args.max_model_len,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_num_seqs=args.max_num_seqs,
        block_size=args.block_size,
        num_kv_blocks=args.num_kv_blocks,
        enable_prefix_caching=not args.no_prefix_caching,
        seed=args.seed,
    )


def cmd_generate(args: argparse.Namespace) -> int:
    from moeserve.engine.llm import LLM
    from moeserve.sampling_params import SamplingParams

    config = engine_config_from_args(args)
    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        seed=args.sampling_seed, stop=args.stop or (),
    )
    llm = LLM(**{f: getattr(config, f) for f in config.__slots__})
    prompts = args.prompt or ["Hello, my name is"]
    if args.chat:
        prompts = [llm.tokenizer.apply_chat_template([{"role": "user", "content": p}]) for p in prompts]
    for out in llm.generate(prompts, params):
        if args.json:
            print(json.dumps({"prompt": out.prompt, "text": out.text, "token_ids": out.token_ids,
                              "finish_reason": out.finish_reason}))
        else:
            print(f"--- prompt: {out.prompt!r}\n{out.text}\n[finish_reason={out.finish_reason}, "
                  f"{len(out.token_ids)} tokens]")
    return 0


def _serve_overrides(args: argparse.Namespace) -> dict:
    """Deploy settings given on the command line (dotted keys), over the config file's or the defaults."""
    flags = {
        "model": args.model, "device": args.device, "app_name": args.app_name, "http.host": args.host,
        "http.port": args.port, "parallel.dp": args.dp, "parallel.ep": args.ep,
        "parallel.redundant_experts": args.redundant_experts, "parallel.tbo": True if args.tbo else None,
        "engine.max_model_len": args.max_model_len, "engine.max_num_seqs": args.max_num_seqs,
        "engine.num_kv_blocks": args.num_kv_blocks, "ingress.replicas": args.replicas,
        "api_key": args.api_key,
    }
    return {k: v for k, v in flags.items() if v is not None}


def cmd_serve(args: argparse.Namespace) -> int:
    import ray

    from moeserve.cluster.config import load_deploy_config, parse_deploy_config
    from moeserve.cluster.launch import connect, local_num_cpus, serve_until_stopped

    overrides = _serve_overrides(args)
    if args.config:
        config = load_deploy_config(args.config, overrides)
    else:
        config = parse_deploy_config(overrides, "command-line options")
    started = connect(args.address, start_local=True, num_cpus=local_num_cpus(config))
    if started:
        # `moeserve status` joins the newest local cluster; this address reaches this one from any shell.
        print(f"moeserve: started a local Ray cluster at {ray.get_runtime_context().gcs_address}", flush=True)
    try:
        return serve_until_stopped(config, detach=False, timeout_s=args.timeout, started_ray=started)
    except (RuntimeError, TimeoutError) as e:
        print(f"moeserve serve: error: {e}", file=sys.stderr)
        return 1
    finally:
        if started:
            ray.shutdown()


def cmd_status(args: argparse.Namespace) -> int:
    from moeserve.cluster.controller import fetch_status, format_status

    try:
        status = fetch_status(args.address, args.app)
    except (ConnectionError, LookupError, TimeoutError) as e:
        print(f"moeserve status: error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(status, indent=2) if args.json else format_status(status))
    return 0


def cmd_rebalance(args: argparse.Namespace) -> int:
    from moeserve.cluster.rebalance_cli import cmd_rebalance as run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moeserve", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text offline with one engine in this process")
    add_engine_args(g)
    g.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    g.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    g.add_argument("--max-tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--sampling-seed", type=int, default=None)
    g.add_argument("--stop", action="append")
    g.add_argument("--json", action="store_true", help="one JSON object per prompt")
    g.set_defaults(func=cmd_generate)

    s = sub.add_parser(
        "serve", help="serve the OpenAI API on Ray Serve (no arguments: the demo model at 127.0.0.1:8000)"
    )
    s.add_argument("--config", default=None, help="deploy.yaml; flags given here override its settings")
    s.add_argument("--model", default=None, help="HF-layout checkpoint directory (default: the demo model)")
    s.add_argument("--host", default=None, help="HTTP host (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=None, help="HTTP port (default 8000)")
    s.add_argument("--dp", type=int, default=None, help="data-parallel ranks (default 1)")
    s.add_argument("--ep", type=int, default=None, help="expert-parallel size: 1 or --dp (default 1)")
    s.add_argument("--redundant-experts", type=int, default=None)
    s.add_argument("--tbo", action="store_true", help="two-batch overlap")
    s.add_argument("--device", default=None, choices=["auto", "cpu", "cuda"])
    s.add_argument("--max-model-len", type=int, default=None)
    s.add_argument("--max-num-seqs", type=int, default=None)
    s.add_argument("--num-kv-blocks", type=int, default=None)
    s.add_argument("--replicas", type=int, default=None, help="HTTP ingress replicas (default 1)")
    s.add_argument("--app-name", default=None, help="Serve application name (default moeserve)")
    s.add_argument("--api-key", default=None, help="require this Bearer key (default $MOESERVE_API_KEY)")
    s.add_argument(
        "--address", default=None, help="Ray cluster to join (default: $RAY_ADDRESS, else a new local one)"
    )
    s.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for the app to be healthy")
    s.set_defaults(func=cmd_serve)

    st = sub.add_parser("status", help="ranks, requests, KV use, prefix-cache hits of a running app")
    st.add_argument("--address", default=None, help="Ray cluster address (default $RAY_ADDRESS, else local)")
    st.add_argument("--app", default="moeserve", help="Serve application name (default moeserve)")
    st.add_argument("--json", action="store_true", help="print the raw status as JSON")
    st.set_defaults(func=cmd_status)

    r = sub.add_parser("rebalance", help="plan (and apply) a new expert placement on a running deployment")
    r.add_argument("--address", default=None, help="Ray cluster address (default $RAY_ADDRESS, else local)")
    r.add_argument("--app", default="moeserve", help="Serve application name (default moeserve)")
    r.add_argument("--dry-run", action="store_true", help="print the plan without moving anything")
    r.add_argument("--plot", default=None, metavar="FILE", help="write a PNG heatmap of load per GPU")
    r.add_argument("--json", action="store_true", help="print the report as JSON")
    r.set_defaults(func=cmd_rebalance)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"moeserve {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader went away (`moeserve status | head -3`): stop without a traceback
        # Python flushes stdout at exit; point it at /dev/null so that the flush cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
