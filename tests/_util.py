"""Helpers shared by the training tests: run configs, metrics, and 2-rank launches through the real launchers."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import Qwen3Config

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "data" / "demo"


def cfg_for(base, data_path, out, **kw):
    c = dict(model_path=base, data_path=data_path, image_dir=str(DEMO), output_dir=str(out),
             zero_config=str(ROOT / "zero_configs" / "zero2.json"), lr=2e-3, schedule="cosine", warmup_ratio=0.0,
             max_tokens=700, max_length=1024, single_image_min_pixels=4096, single_image_max_pixels=20480,
             multiple_image_min_pixels=4096, multiple_image_max_pixels=8192, crop_min_pixels=4096,
             crop_max_pixels=8192, bf16=False, gradient_checkpointing=False, seed=0, log_interval=1, epochs=1)
    c.update(kw)
    return c


def _no_nan(token):
    raise ValueError(f"metrics.jsonl holds {token}: not JSON")


def metrics(out):
    """metrics.jsonl read as a strict JSON reader does (NaN / Infinity are errors)."""
    return [json.loads(line, parse_constant=_no_nan) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_script(script: str, cfg: dict, tmp: Path, timeout=300) -> subprocess.CompletedProcess:
    """`python script --config cfg.json` as a user runs it (one process, its own port); returns the finished process."""
    path = tmp / f"cfg_{Path(script).stem}_{len(list(tmp.iterdir()))}.json"
    path.write_text(json.dumps(cfg))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                              "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env.update(DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, str(ROOT / script), "--config", str(path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def launch(launcher: str, cfg: dict, tmp: Path, timeout=300, script: str = "sft.py", args=(), env=None):
    """`script --config cfg.json` on 2 CPU ranks through torchrun or the deepspeed launcher; returns stdout."""
    path = tmp / f"cfg_{launcher}_{os.getpid()}_{len(list(tmp.iterdir()))}.json"
    path.write_text(json.dumps(cfg))
    extra = env or {}
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                              "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **extra)
    port = str(free_port())
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port]
    else:
        cmd = [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", "2", "--master_port", port]
    script = script if os.path.isabs(script) else str(ROOT / script)
    r = subprocess.run(cmd + [script, "--config", str(path), "--dist_timeout_s=120", *args], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


# ---------------------------------------------------------------------------------------------------------------
# exports read the way other tools read them: nothing here goes through model.py


def official_keys(cfg: dict) -> set:
    """Tensor names of an official Ovis2.5 checkpoint with this config.json, written from the spec's table (spec 3),
    not from model.py: the names the official loader and vLLM's name-based loader look up."""
    llm, vit = cfg["llm_config"], cfg["vit_config"]
    keys = {"llm.model.embed_tokens.weight", "llm.model.norm.weight", "visual_tokenizer.head.0.weight",
            "visual_tokenizer.head.1.weight", "visual_tokenizer.head.1.bias", "vte.weight"}
    if not llm.get("tie_word_embeddings", False):  # tied: the official save omits lm_head
        keys.add("llm.lm_head.weight")
    for i in range(llm["num_hidden_layers"]):
        keys |= {f"llm.model.layers.{i}.{m}.weight" for m in (
            "input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
            "self_attn.v_proj", "self_attn.o_proj", "self_attn.q_norm", "self_attn.k_norm", "mlp.gate_proj",
            "mlp.up_proj", "mlp.down_proj")}
    v = "visual_tokenizer.vit.vision_model."
    keys |= {v + k for k in ("embeddings.patch_embedding.weight", "embeddings.patch_embedding.bias",
                             "embeddings.position_embedding.weight", "post_layernorm.weight", "post_layernorm.bias")}
    for i in range(vit["num_hidden_layers"]):
        keys |= {f"{v}encoder.layers.{i}.{m}.{x}" for x in ("weight", "bias") for m in (
            "layer_norm1", "layer_norm2", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
            "self_attn.out_proj", "mlp.fc1", "mlp.fc2")}
    return keys


def weight_dtypes(ckpt) -> dict:
    """{tensor name: safetensors dtype ("BF16", "F32", ...)} of a checkpoint dir, single file or sharded index."""
    ckpt = Path(ckpt)
    index = ckpt / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else [
        "model.safetensors"]
    out = {}
    for fn in files:
        with safe_open(str(ckpt / fn), "pt") as f:
            out.update({k: f.get_slice(k).get_dtype() for k in f.keys()})  # noqa: SIM118
    return out


def rope_base_as_4x_reads_it(llm_config: dict) -> float:
    """transformers 4.x (the official remote code's version) reads the RoPE base from `rope_theta` at the top level
    of llm_config only; 5.x's `rope_parameters` is an unknown key to it."""
    return Qwen3Config(**{k: v for k, v in llm_config.items() if k != "rope_parameters"}).rope_parameters["rope_theta"]


def config_changes(got: dict, src: dict) -> set:
    """Keys whose value differs between two config.json dicts ("llm_config.rope_theta" for a nested one)."""
    out = {k for k in set(got) | set(src) if k not in ("llm_config", "vit_config") and got.get(k) != src.get(k)}
    for sub in ("llm_config", "vit_config"):
        a, b = got.get(sub) or {}, src.get(sub) or {}
        out |= {f"{sub}.{k}" for k in set(a) | set(b) if a.get(k) != b.get(k)}
    return out


ST_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


def check_export(out, source, dtype: str):
    """An export as other tools see it: config.json is the source's JSON key by key (only torch_dtype may change,
    and rope_theta where the source lacked it), every other non-weight file a byte copy of the source's, the
    safetensors exactly the official key set in `dtype`, and the RoPE base a transformers 4.x reader gets is the
    source's."""
    out, source = Path(out), Path(source)
    got, src = (json.loads((d / "config.json").read_text()) for d in (out, source))
    allowed = {"torch_dtype"} | ({"llm_config.rope_theta"} if "rope_theta" not in src["llm_config"] else set())
    assert config_changes(got, src) <= allowed, config_changes(got, src)
    assert got["torch_dtype"] == dtype
    src_theta = src["llm_config"].get("rope_theta") or src["llm_config"]["rope_parameters"]["rope_theta"]
    assert rope_base_as_4x_reads_it(got["llm_config"]) == src_theta

    def aux(d):
        return {f.name for f in d.iterdir() if f.is_file() and not f.name.endswith(".safetensors")
                and f.name not in ("config.json", "model.safetensors.index.json")}

    record = "ovis_tune.json"  # our training record beside config.json (the official code never reads it)
    assert aux(out) - {record} == aux(source) - {record}, aux(out) ^ aux(source)
    for name in aux(source) - {record}:
        assert (out / name).read_bytes() == (source / name).read_bytes(), name
    if (out / record).exists():
        assert json.loads((out / record).read_text())["trained_by"].endswith(".py")
    dtypes = weight_dtypes(out)
    assert set(dtypes) == official_keys(src), set(dtypes) ^ official_keys(src)
    assert set(dtypes.values()) == {ST_DTYPES[dtype]}, set(dtypes.values())


def hub_cache(root: Path, base: str, repo: str = "tiny-org/ovis-tiny") -> dict:
    """An HF cache ($HF_HOME/hub) holding `repo` at two commits: main and the tag v1 (both the tiny base)."""
    d = root / "hub" / f"models--{repo.replace('/', '--')}"
    shas = {"main": "1" * 40, "v1": "2" * 40}
    for ref, sha in shas.items():
        shutil.copytree(base, d / "snapshots" / sha)
        (d / "refs").mkdir(parents=True, exist_ok=True)
        (d / "refs" / ref).write_text(sha)
    return {ref: str(d / "snapshots" / sha) for ref, sha in shas.items()} | {"sha_v1": shas["v1"]}


def check_adapter(adapter, base_config: dict):
    """A lora.py adapter as stock peft reads it: its config parses as a LoraConfig, and every tensor sits on a
    module of the official checkpoint (base_model.model.<official name>): a LoRA pair on an official linear layer,
    a modules_to_save copy under an official tensor name."""
    from peft import LoraConfig, PeftConfig

    assert isinstance(PeftConfig.from_pretrained(str(adapter)), LoraConfig)
    names = official_keys(base_config)
    with safe_open(str(Path(adapter) / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())  # noqa: SIM118
    assert keys
    for k in keys:
        assert k.startswith("base_model.model."), k
        name = k.removeprefix("base_model.model.")
        if ".lora_A." in name or ".lora_B." in name:
            assert name.split(".lora_")[0] + ".weight" in names, k
        else:
            assert name in names, k


# ---------------------------------------------------------------------------------------------------------------
# attention


def varlen_reference(q, k, v, cu_q, cu_k, max_q: int, max_k: int, scale=None, window_size=(-1, -1),
                     enable_gqa: bool = False) -> torch.Tensor:
    """torch's varlen_attn contract, per segment with SDPA: (T, H, D) packed q/k/v -> (T, H, D). The CPU reference
    the CUDA kernel is tested against; window_size (-1, 0) is causal."""
    out = []
    for i in range(len(cu_q) - 1):
        qs = q[cu_q[i]:cu_q[i + 1]].transpose(0, 1)
        ks, vs = (t[cu_k[i]:cu_k[i + 1]].transpose(0, 1) for t in (k, v))
        out.append(torch.nn.functional.scaled_dot_product_attention(
            qs, ks, vs, scale=scale, is_causal=window_size == (-1, 0), enable_gqa=enable_gqa).transpose(0, 1))
    return torch.cat(out)
