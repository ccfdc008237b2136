"""Helpers shared by the training tests: run configs, metrics, and 2-rank launches through the real launchers."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

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


def metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(launcher: str, cfg: dict, tmp: Path, timeout=300, script: str = "sft.py", args=()):
    """`script --config cfg.json` on 2 CPU ranks through torchrun or the deepspeed launcher; returns stdout."""
    path = tmp / f"cfg_{launcher}_{os.getpid()}_{len(list(tmp.iterdir()))}.json"
    path.write_text(json.dumps(cfg))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                              "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
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
