"""Run by test_export.py with transformers 4.51.3 first on sys.path (tests/readers_tf451.txt): a reader that is not
ours. For each export it builds stock transformers' Qwen3ForCausalLM from config.json's llm_config as the official
remote code does (a Qwen3Config from the dict, which reads the RoPE base from `rope_theta` only), fills it with the
export's llm.* tensors, feeds it our model's input embeddings of an image prompt and prints, as JSON, how far its
logits and greedy tokens are from ours. Imports nothing of the project (model.py needs transformers 5.x)."""

import json
import os
import sys

import torch
import transformers
from safetensors import safe_open
from transformers import Qwen3Config, Qwen3ForCausalLM

EOS = [151645, 151643]  # <|im_end|>, <|endoftext|>: generation_config.json of the released checkpoints


def llm_weights(ckpt: str) -> dict:
    index = os.path.join(ckpt, "model.safetensors.index.json")
    files = sorted(set(json.load(open(index))["weight_map"].values())) if os.path.exists(index) else [
        "model.safetensors"]
    sd = {}
    for fn in files:
        with safe_open(os.path.join(ckpt, fn), "pt") as f:
            sd.update({k[len("llm."):]: f.get_tensor(k).float() for k in f.keys() if k.startswith("llm.")})
    return sd


def read(case: dict) -> dict:
    with open(os.path.join(case["dir"], "config.json")) as f:
        llm_config = Qwen3Config(**json.load(f)["llm_config"])
    out = {"dir": case["dir"], "transformers": transformers.__version__, "rope_theta": llm_config.rope_theta}
    if "inputs" not in case:  # a config-only case (the real 9B config)
        return out
    torch.manual_seed(0)
    m = Qwen3ForCausalLM(llm_config).float().eval()
    missing, unexpected = m.load_state_dict(llm_weights(case["dir"]), strict=False)
    m.tie_weights()
    ours = torch.load(case["inputs"])
    with torch.no_grad():
        logits = m(inputs_embeds=ours["embeds"]).logits
        greedy = m.generate(inputs_embeds=ours["embeds"], max_new_tokens=ours["greedy"].shape[1], do_sample=False,
                            eos_token_id=EOS, pad_token_id=EOS[1])
    out.update(missing=missing, unexpected=unexpected, max_diff=(logits - ours["logits"]).abs().max().item(),
               argmax_agree=(logits.argmax(-1) == ours["logits"].argmax(-1)).float().mean().item(),
               greedy=greedy[0].tolist(), ours_greedy=ours["greedy"][0].tolist())
    return out


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        cases = json.load(f)
    print(json.dumps([read(c) for c in cases]))
