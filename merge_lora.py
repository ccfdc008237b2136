"""Merge a LoRA adapter (lora.py) into its base and write a plain Ovis2.5 checkpoint, checked against the adapter.

Launch:
    python merge_lora.py --adapter out/demo_lora/final --out out/demo_lora/merged        # base read from the adapter
    python merge_lora.py --base AIDC-AI/Ovis2.5-9B --adapter out/lora_9b/final --out out/lora_9b/merged --dtype bf16

What it does, in order:
- refuses an existing --out (nothing is ever overwritten) and a --base other than the adapter's recorded base
  (unless --force); loads the base in fp32 (W + s * B @ A is computed in fp32 and cast once at the end) and
  attaches the adapter, every tensor checked against the base first: an adapter of another model fails naming the
  tensor and both shapes;
- runs a probe of its own (a synthetic image and a question, in the chat template) through base + adapter, merges
  (modules_to_save copies replace their originals), runs the probe again, prints the largest logit difference and
  fails above --tol;
- writes the official layout: config.json, safetensors shards with exactly the base's key names, tokenizer,
  processor, generation config and remote-code files copied from the base; into a temp dir, then renamed.
Memory: the base in fp32, ~10 GB for the 2B and ~37 GB for the 9B; --device cuda merges on a GPU.
"""

import argparse
import os
import time

import numpy as np
import torch
from PIL import Image

import hub
import model as ovis

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def probe_inputs(tokenizer, device, geometry: dict) -> dict:
    """A fixed image (colour gradients + a block) and question: exercises the ViT, visual head, vte and the LLM, cut
    as the base checkpoint cuts images (`geometry`)."""
    y, x = np.mgrid[0:96, 0:128]
    img = np.stack([x * 2, y * 2, (x + y) % 256], -1).astype(np.uint8)
    img[30:60, 40:80] = (250, 30, 30)
    msgs = [{"role": "user", "content": [{"type": "image", "image": Image.fromarray(img)},
                                         {"type": "text", "text": "What is in the red box? Answer briefly."}]}]
    inp = ovis.build_inputs(msgs, tokenizer, enable_thinking=True, min_pixels=128 * 128, max_pixels=448 * 448,
                            **geometry)
    return {k: inp[k].to(device) for k in ("input_ids", "pixel_values", "grid_thws")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", help="base checkpoint dir or Hub id (default: the base recorded in the adapter)")
    ap.add_argument("--adapter", required=True, help="adapter dir written by lora.py (output_dir/final or best)")
    ap.add_argument("--out", required=True, help="new dir for the merged checkpoint; must not exist")
    ap.add_argument("--dtype", default="bf16", choices=tuple(DTYPES), help="dtype of the written weights")
    ap.add_argument("--device", default="cpu", help="where the merge and the probe run")
    ap.add_argument("--tol", type=float, default=1e-3, help="largest allowed probe logit difference (fp32)")
    ap.add_argument("--force", action="store_true", help="merge onto a --base other than the one the adapter records")
    a = ap.parse_args(argv)
    if os.path.exists(a.out):
        raise SystemExit(f"merge_lora: {a.out} exists; choose a new --out (nothing is overwritten)")
    recorded = hub.adapter_base(a.adapter)
    same = lambda x, y: x == y or (os.path.isdir(x) and os.path.isdir(y) and os.path.samefile(x, y))
    if a.base and not same(a.base, recorded) and not a.force:
        raise SystemExit(f"merge_lora: --base {a.base} is not the base the adapter was trained on ({recorded}, "
                         f"in {a.adapter}/adapter_config.json); pass --force to merge onto it anyway")
    base = hub.resolve_checkpoint(a.base or recorded)  # a dir or a Hub id
    t0 = time.time()
    model = ovis.Ovis25.from_pretrained(base, dtype=torch.float32, device=a.device).eval()
    keys = set(model.state_dict())
    peft_model = hub.load_adapter(model, a.adapter)
    print(f"loaded {base} + {a.adapter} in {time.time() - t0:.0f}s")

    probe = probe_inputs(ovis.load_tokenizer(base), a.device, model.config.geometry)
    with torch.no_grad():
        want = peft_model(**probe).logits  # (1, L, vocab)
        merged = peft_model.merge_and_unload().eval()
        diff = (merged(**probe).logits - want).abs().max().item()
    print(f"probe ({probe['input_ids'].shape[1]} tokens, 1 image): max |merged - adapter| logit difference "
          f"{diff:.3e} (fp32, tolerance {a.tol:g})")
    if not diff <= a.tol:
        raise SystemExit(f"merge_lora: merged model differs from base + adapter by {diff:.3e} > {a.tol:g}; not written")
    if set(merged.state_dict()) != keys:
        raise SystemExit(f"merge_lora: the merged key set differs from the base's: "
                         f"{sorted(set(merged.state_dict()) ^ keys)[:5]}")
    merged.save_pretrained(a.out, dtype=DTYPES[a.dtype], source_dir=base, record=hub.read_record(a.adapter))
    print(f"wrote {a.out} ({a.dtype}, official layout, files copied from {base})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
