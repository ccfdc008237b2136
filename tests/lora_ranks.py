"""Run by test_lora.py under torchrun (2 CPU ranks): lora.main, then check the live model on every rank against the
base checkpoint and write a report + the live model's probe logits for the test to compare with saved files."""

import json
import os
import sys

import deepspeed
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import hub  # noqa: E402
import lora  # noqa: E402
import merge_lora  # noqa: E402
import model as M  # noqa: E402


def official(name: str) -> str:
    """PeftModel parameter name -> the base checkpoint's key."""
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".").replace(".original_module.", ".")


def main():
    cfg = common.load_config(lora.Config)
    common.setup_distributed(cfg.dist_timeout_s)  # ours, so lora.main leaves it alive for the checks below
    peft_model = lora.main(cfg)
    rank = torch.distributed.get_rank()
    path = hub.resolve_checkpoint(cfg.model_path)  # a Hub id: the cache, after lora.main fetched it
    base = dict(M.iter_checkpoint(path))
    params = dict(peft_model.named_parameters())
    z3 = hasattr(next(iter(params.values())), "ds_id")
    report = {"base_checked": 0, "base_changed": [], "lora": 0, "lora_B_nonzero": 0, "copies": 0,
              "copies_changed": 0, "vit_adapters": 0, "missing": []}
    with deepspeed.zero.GatheredParameters(list(params.values()), enabled=z3):
        for name, p in params.items():
            if "lora_" in name:
                report["lora"] += 1
                report["lora_B_nonzero"] += int("lora_B" in name and bool(p.detach().abs().sum() > 0))
                report["vit_adapters"] += int("visual_tokenizer.vit" in name)
            elif ".modules_to_save." in name:
                key = name.removeprefix("base_model.model.").replace(".modules_to_save.default.", ".")
                report["copies"] += 1
                report["copies_changed"] += int(not torch.equal(p.detach(), base[key]))
            elif official(name) in base:
                report["base_checked"] += 1
                if not torch.equal(p.detach(), base[official(name)]):
                    report["base_changed"].append(name)
            else:
                report["missing"].append(name)
    peft_model.eval()
    probe = merge_lora.probe_inputs(M.load_tokenizer(path), "cpu", M.read_config(path).geometry)
    with torch.no_grad():
        logits = peft_model(**probe).logits  # every rank runs it: a collective under ZeRO-3
    if rank == 0:
        torch.save(logits, os.path.join(cfg.output_dir, "live_logits.pt"))
        with open(os.path.join(cfg.output_dir, "report.json"), "w") as f:
            json.dump(report, f)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
