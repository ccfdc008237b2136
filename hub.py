"""Checkpoints by path or Hugging Face Hub id ("AIDC-AI/Ovis2.5-9B", "org/name@revision": fetched once per node into
the HF cache, safetensors and text files only), peft LoRA adapters on them (the base an adapter records, its tensors
checked against the base before peft loads it), and the training record an export carries (the budgets, tools and
thinking it was trained with: the defaults of grpo.py and infer.py). Nothing Ovis-specific: model.py and the scripts
build on it."""

import os
import re

import torch

from common import RECORD_FILE, ConfigError, read_json

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")  # org/name or org/name@revision
HUB_FILES = ["*.safetensors", "*.json", "*.txt", "*.jinja", "*.py"]  # never pickled weights


def split_hub_id(name: str) -> tuple[str, str | None]:
    """"org/name@rev" -> ("org/name", "rev"); a local dir or a plain id -> (name, None)."""
    if os.path.isdir(name) or not HUB_ID.match(name):
        return name, None
    repo, _, revision = name.partition("@")
    return repo, revision or None


def resolve_checkpoint(name: str) -> str:
    """A checkpoint dir (as is) or a Hub id ("AIDC-AI/Ovis2.5-9B", "org/name@rev") fetched into the HF cache (HUB_FILES)
    -> a local dir. Every rank calls it: local rank 0 downloads first, the others find the files after a barrier."""
    if os.path.isdir(name):
        return name
    if not HUB_ID.match(name):
        raise FileNotFoundError(f"{name}: no such checkpoint directory (a Hub id reads org/name or org/name@revision)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    repo, revision = split_hub_id(name)
    together = torch.distributed.is_available() and torch.distributed.is_initialized()
    first = int(os.environ.get("LOCAL_RANK", "0")) == 0
    if together and not first:
        torch.distributed.barrier()
    try:
        path, err = snapshot_download(repo, revision=revision, allow_patterns=HUB_FILES), None
    except Exception as e:  # noqa: BLE001 (re-raised below with what to do, after the barrier)
        path, err = None, e
    if together and first:
        torch.distributed.barrier()  # reached on failure too: the other ranks must never hang
    if err is not None:
        offline = os.environ.get("HF_HUB_OFFLINE") or "unset"
        why = ("the Hugging Face Hub has no such model or revision (or it is gated: run `hf auth login`)"
               if isinstance(err, (RepositoryNotFoundError, RevisionNotFoundError))
               else "it is not in the Hugging Face cache and the Hub cannot be reached")
        get = f"hf download {repo}" + (f" --revision {revision}" if revision else "")
        raise FileNotFoundError(f"model {name!r} is not a local directory, and {why} (HF_HUB_OFFLINE={offline}). "
                                f"Download it where there is network (`{get}` fills the same cache) or pass a "
                                "local checkpoint directory instead.") from err
    return path


def adapter_base(adapter_dir: str) -> str:
    """The base an adapter dir records, as resolve_checkpoint takes it: "org/name@rev", "org/name" or a dir."""
    path = os.path.join(adapter_dir, "adapter_config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{adapter_dir}: no adapter_config.json, not a peft LoRA adapter (lora.py writes one "
                                "to output_dir/final)")
    cfg = read_json(path, "adapter config")
    base, revision = cfg.get("base_model_name_or_path"), cfg.get("revision")
    if not base:
        raise ConfigError(f"{path}: base_model_name_or_path is empty; pass the base checkpoint explicitly")
    return f"{base}@{revision}" if revision and not os.path.isdir(base) else base


def load_adapter(model: torch.nn.Module, adapter_dir: str):
    """A peft LoRA dir (lora.py, grpo.py) -> a PeftModel around `model`. Every tensor is checked against the base
    first, so an adapter of another model fails naming the tensor and both shapes."""
    from peft import PeftModel
    from safetensors import safe_open

    adapter_base(adapter_dir)  # a clear error when it is no adapter dir
    path = os.path.join(adapter_dir, "adapter_model.safetensors")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{adapter_dir}: no adapter_model.safetensors")
    modules, params = dict(model.named_modules()), dict(model.named_parameters())
    with safe_open(path, framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
            shape, name = tuple(f.get_slice(key).get_shape()), key.removeprefix("base_model.model.")
            if ".lora_A." in name or ".lora_B." in name:
                target, ab = name.split(".lora_")[0], name.split(".lora_")[1][0]
                lin = modules.get(target)
                if not isinstance(lin, torch.nn.Linear):
                    raise ConfigError(f"{path}: {key}: the base has no linear layer {target!r}")
                want, got = (lin.in_features, shape[1]) if ab == "A" else (lin.out_features, shape[0])
            else:  # a modules_to_save tensor: a full copy of the base's
                if name not in params:
                    raise ConfigError(f"{path}: {key}: the base has no parameter {name!r}")
                want, got = tuple(params[name].shape), shape
            if want != got:
                raise ConfigError(f"{path}: {key} has shape {shape}, which does not fit the base ({want} expected): "
                                 "the adapter was trained on another model")
    return PeftModel.from_pretrained(model, adapter_dir)


# ----------------------------------------------------------------------------------------------------------------
# What an export records of its run (RECORD_FILE beside config.json; the official code never reads it)


def read_record(checkpoint_dir: str) -> dict:
    """The training record an export carries (RECORD_FILE: budgets, tools, thinking); {} for other checkpoints."""
    path = os.path.join(checkpoint_dir, RECORD_FILE)
    return read_json(path, "training record") if os.path.exists(path) else {}


def training_record(cfg, script: str, keys: tuple[str, ...]) -> dict:
    """What an export records of its run (RECORD_FILE): the script and the settings among `keys` the config has."""
    return {"trained_by": script, **{k: getattr(cfg, k) for k in keys if hasattr(cfg, k)}}


def apply_record(cfg, record: dict, keys: tuple[str, ...]) -> list[str]:
    """The start checkpoint's training record as defaults: each of `keys` the user did not set (in --config or as
    --key=value; load_config notes which) takes the recorded value. Returns those names, for the `model:` line. A
    Config built in Python (tests, the API) has no such note and is taken as it is."""
    given = getattr(cfg, "given", None)
    taken = [k for k in keys if given is not None and k not in given and k in record and hasattr(cfg, k)]
    for k in taken:
        setattr(cfg, k, record[k])
    return taken
