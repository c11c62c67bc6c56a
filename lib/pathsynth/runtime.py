"""Seeding, the run header, the offline guard, the device and readable progress.

``start_stage(name)`` is the first call of every notebook: it loads and validates params.yaml,
seeds every generator, turns the offline guard on (unless ``allow_network: true``) and prints a
header with the git sha, library versions, device and the resolved params of the stage.
"""
from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import platform
import random
import socket
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import config

log = logging.getLogger("pathsynth")

# ------------------------------------------------------------------------------ offline guard
_HUB_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1", "DO_NOT_TRACK": "1"}
_real_connect = socket.socket.connect
_real_create_connection = socket.create_connection
_network_allowed_for: list[str] = []


class NetworkDisabled(RuntimeError):
    """Raised when code tries to reach a non-local address while the offline guard is on."""


def _is_local(address) -> bool:
    if not isinstance(address, tuple):  # AF_UNIX path
        return True
    host = address[0]
    if host in ("localhost", ""):
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return ip.is_loopback


def _guarded_connect(self, address):
    if not _network_allowed_for and not _is_local(address):
        raise NetworkDisabled(
            f"network access to {address!r} blocked: the study runs offline. Set 'allow_network: true' "
            "in params.yaml for steps you asked to download (e.g. data.source.download).")
    return _real_connect(self, address)


def _guarded_create_connection(address, *args, **kwargs):
    if not _network_allowed_for and not _is_local(address):
        raise NetworkDisabled(f"network access to {address!r} blocked: the study runs offline")
    return _real_create_connection(address, *args, **kwargs)


def enable_offline_guard() -> None:
    """Hubs offline and non-loopback sockets refused, for this process and its children."""
    os.environ.update(_HUB_ENV)
    socket.socket.connect = _guarded_connect
    socket.create_connection = _guarded_create_connection


def disable_offline_guard() -> None:
    socket.socket.connect = _real_connect
    socket.create_connection = _real_create_connection
    for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.pop(k, None)


@contextlib.contextmanager
def network_allowed(reason: str, allowed: bool):
    """Lift the guard for one explicit user request (``allowed`` comes from params.allow_network)."""
    if not allowed:
        raise NetworkDisabled(f"{reason} needs the network, but params.yaml has allow_network: false")
    _network_allowed_for.append(reason)
    try:
        yield
    finally:
        _network_allowed_for.pop()


def resolve_weights(spec: str, allow_network: bool, root: Path, setting: str) -> tuple[str, dict]:
    """Where pretrained weights come from: an existing local path (relative to the study root), or a
    hub id the user named, only with ``allow_network: true``. Returns (source, from_pretrained kwargs).
    Never a silent substitute: anything else is an error naming the setting."""
    local = Path(spec).expanduser()
    local = local if local.is_absolute() else root / local
    if local.exists():
        return str(local), {"local_files_only": True}
    looks_like_hub_id = spec.count("/") == 1 and not spec.startswith((".", "/", "~"))
    if looks_like_hub_id and allow_network:
        return spec, {}
    if looks_like_hub_id:
        raise FileNotFoundError(
            f"{setting}: '{spec}' is not a local folder ({local} does not exist), and fetching it as a hub id "
            "needs allow_network: true in params.yaml (nothing is downloaded silently)")
    raise FileNotFoundError(f"{setting}: {local} does not exist")


# ------------------------------------------------------------------------------ seeding, device
def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)


def derive_seed(seed: int, *names: str | int) -> int:
    """A stable child seed for one purpose (a split, a shard), independent of Python's hash salt."""
    key = "/".join(str(n) for n in names)
    return int(np.random.SeedSequence([seed % 2**32, zlib.crc32(key.encode())]).generate_state(1)[0])


def resolve_device(requested: str = "auto") -> str:
    import torch

    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("params.device is 'cuda' but no CUDA device is available")
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":  # TF32 tensor cores for fp32 matrix products (GPU runs are statistically reproducible only)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return requested


def set_determinism(device: str) -> bool:
    """On the CPU, ask torch for deterministic algorithms (warning, not failing, where an op has none):
    with the seeds, a run is then bit-exact on the same machine and thread count (tests/test_repro.py).
    On GPUs the study is statistically reproducible only (cuBLAS/cuDNN kernels and atomics), so nothing
    is forced there."""
    import torch

    on = device == "cpu"
    torch.use_deterministic_algorithms(on, warn_only=True)
    return on


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def compute_record(device: str) -> dict:
    """What floating-point results depend on: CPU model and vector extensions, torch's thread count,
    and the GPU where one is used."""
    import torch

    rec = {"cpu": cpu_model(), "torch_threads": torch.get_num_threads(),
           "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    if device == "cuda":
        rec["gpu"] = torch.cuda.get_device_name(0)
    return rec


# ------------------------------------------------------------------------------ header
# What decides a run's numbers. A repro rewrites dvc.lock, params.yaml (a profile) and the git-tracked metrics and
# plots as it goes: those do not make the code "dirty".
CODE_PATHS = ("lib", "notebooks", "dvc.yaml", "profiles", "pyproject.toml", "requirements.txt")


def git_sha(root: Path) -> str:
    """The commit the code came from, with "-dirty" when the code (CODE_PATHS) differs from it."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", *CODE_PATHS],
                               cwd=root, capture_output=True, text=True, timeout=5).stdout.strip()
        return (sha or "unknown") + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("torch", "torchvision", "numpy", "timm", "diffusers", "scikit-learn", "h5py", "dvc"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


@dataclass
class Stage:
    name: str
    params: config.Params
    root: Path
    device: str
    seed: int

    def stage_params(self):
        return getattr(self.params, self.name, None)

    # one name per stage keys every output path (CONVENTIONS.md)
    @property
    def data_dir(self) -> Path:
        return self.root / "data" / self.name

    @property
    def models_dir(self) -> Path:
        return self.root / "models" / self.name

    @property
    def metrics_path(self) -> Path:
        return self.root / "metrics" / f"{self.name}.json"

    @property
    def plots_dir(self) -> Path:
        return self.root / "plots" / self.name

    def figure_path(self, what: str) -> Path:
        p = self.root / "reports" / "figures" / f"{self.name}_{what}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def path(self, p: str | Path) -> Path:
        """A params path, relative to the project root unless absolute."""
        p = Path(p).expanduser()
        return p if p.is_absolute() else (self.root / p)

    def write_metrics(self, metrics: dict) -> Path:
        return write_json_atomic(self.metrics_path, metrics)


def write_json_atomic(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")
    tmp.replace(path)
    return path


def _json_default(o):
    if isinstance(o, np.bool_):
        return bool(o)
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def setup_logging() -> None:
    if not log.handlers:
        h = logging.StreamHandler(sys.stdout)
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        log.addHandler(h)
        log.setLevel(logging.INFO)
        log.propagate = False


def log_reused(what: str, path, finished: str) -> None:
    """Log that finished work of an earlier execution (cached runs, complete shards) was reused instead of redone:
    the report's timing table reads this line (as it reads the training loop's resume line) and marks the stage's
    wall time as that of its last execution only."""
    log.info(f"{what}: resumed from {path} (finished earlier: {finished})")


def start_stage(name: str, device: str | None = None, params_path: str | Path | None = None) -> Stage:
    setup_logging()
    root = config.project_root(Path(params_path).parent if params_path else None)
    params = config.load(params_path or root / "params.yaml")
    if not params.allow_network:
        enable_offline_guard()
    seed_everything(params.seed)
    dev = resolve_device(device or params.device)
    deterministic = set_determinism(dev)
    stage = Stage(name=name, params=params, root=root, device=dev, seed=params.seed)
    header = {"stage": name, "profile": params.profile, "git": git_sha(root), "device": dev,
              "seed": params.seed, "offline": not params.allow_network, "versions": versions(),
              "host": f"{platform.node()} ({os.cpu_count()} cpus)", **compute_record(dev),
              "deterministic_algorithms": deterministic}
    print("=" * 78)
    print(f"pathsynth stage '{name}'  " + json.dumps(header, default=str))
    sp = stage.stage_params()
    print("params: " + json.dumps({"seed": params.seed, "data": params.data.model_dump(),
                                   name: sp.model_dump() if sp is not None else None}, default=str))
    print("=" * 78)
    return stage


# ------------------------------------------------------------------------------ progress
def progress(iterable=None, total=None, desc: str = "", unit: str = "it"):
    """tqdm that stays readable in logs: in a terminal it redraws, in a log (papermill
    --log-output, DVC) it prints a line at most every 15 s."""
    from tqdm import tqdm

    interactive = sys.stderr.isatty()
    return tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr,
                mininterval=0.5 if interactive else 15.0, dynamic_ncols=interactive, ascii=not interactive)


class RateLogger:
    """A log line with loss, rate and ETA for training loops (the loop decides how often)."""

    def __init__(self, total_steps: int, name: str = "train"):
        self.total, self.name = total_steps, name
        self.t0 = time.perf_counter()

    def __call__(self, step: int, items_done: int, **values) -> None:
        dt = time.perf_counter() - self.t0
        rate = items_done / dt if dt > 0 else float("nan")
        eta = dt / max(step, 1) * (self.total - step)
        vals = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
        log.info(f"{self.name} step {step}/{self.total} {vals} {rate:.1f} img/s eta {eta:.0f}s")
