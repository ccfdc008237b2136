"""Benchmarks behind the speed/memory targets of the issues. One command per stage, one run each:

    python bench.py model   # packed vs padded fwd+bwd tokens/s on mixed lengths; loss peak memory chunked vs full
    python bench.py sft     # sft.py tokens/s and real-token fraction: packed micro-batches vs one sample each
    python bench.py infer   # a 3-Crop tool trajectory: KV continuation vs re-prefill per turn; generation tok/s
    python bench.py lora    # LoRA vs full SFT: trainable params, optimizer-state bytes, step time (+ exact 9B counts)
    python bench.py grpo    # GRPO rollouts: shared vs per-completion prompt; demo steps; model path vs vLLM
    python bench.py grpo --vllm-only [--model DIR]   # only the model path vs vLLM part
    python bench.py serve   # infer.py --serve: N concurrent clients x M requests vs one by one (--use-vllm)
    python bench.py picture # infer.py --bench: peak memory of one HR-Bench 8K picture (7680x4320) on its way in
    python bench.py gpu     # on a GPU: varlen vs SDPA vs eager, SFT MFU at 8k/16k rows, LoRA, generation, GRPO

Figures are ratios measured on this machine (CPU by default, CUDA when available); absolute numbers depend on it.
"""

import json
import os
import re
import resource
import subprocess
import sys
import time

import torch
from PIL import Image

import common
import model as M
import tools

# A random Ovis2.5 whose per-token compute splits like Ovis2.5-2B's (layers ~6x the lm_head), scaled down to run
# on a CPU: the vocab is cut to 8192 here because with the real vocab a 512-wide toy model is all lm_head.
BENCH_CONFIG = {
    "hidden_size": 512, "visual_vocab_size": 1024,
    "llm_config": {"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 8, "num_attention_heads": 8,
                   "num_key_value_heads": 4, "head_dim": 64, "vocab_size": 8192, "rms_norm_eps": 1e-6,
                   "rope_theta": 1000000, "max_position_embeddings": 40960, "tie_word_embeddings": True},
    "vit_config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                   "patch_size": 16, "image_size": 64, "hidden_stride": 2, "window_size": 64},
}


def _timed(fn, repeats=3):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def bench_packing():
    """Same 24 mixed-length samples (64..1024 tokens, loss on the second half of each), two ways:
    padded micro-batches of 4 samples (the seed's batching) vs rows packed up to 1024 tokens."""
    torch.manual_seed(0)
    m = M.Ovis25.from_config(BENCH_CONFIG).train()
    g = torch.Generator().manual_seed(0)
    lengths = torch.exp(torch.empty(24).uniform_(4.16, 6.93, generator=g)).long().tolist()  # log-uniform 64..1024
    samples = [torch.randint(0, 8000, (n,), generator=g) for n in lengths]
    labels = [torch.where(torch.arange(n) >= n // 2, s, M.IGNORE_ID) for s, n in zip(samples, lengths)]

    def padded():
        for i in range(0, len(samples), 4):
            chunk, lab = samples[i:i + 4], labels[i:i + 4]
            t = max(len(s) for s in chunk)
            ids = torch.zeros(len(chunk), t, dtype=torch.long)  # padding id is masked anyway
            lb = torch.full((len(chunk), t), M.IGNORE_ID)
            mask = torch.zeros(len(chunk), t, dtype=torch.long)
            for r, (s, y) in enumerate(zip(chunk, lab)):
                ids[r, :len(s)], lb[r, :len(s)], mask[r, :len(s)] = s, y, 1
            m(ids, attention_mask=mask, labels=lb).loss.backward()

    rows = common.pack(lengths, 1024)  # the same packing as training

    def packed():
        for row in rows:
            ids = torch.cat([samples[i] for i in row])[None]
            lb = torch.cat([labels[i] for i in row])[None]
            pos = torch.cat([torch.arange(lengths[i]) for i in row])[None]
            m(ids, labels=lb, position_ids=pos).loss.backward()

    n_real = sum(lengths)
    t_pad, t_pack = _timed(padded), _timed(packed)
    n_pad = sum(4 * max(lengths[i:i + 4]) for i in range(0, len(lengths), 4))
    print(f"packing: {n_real} real tokens | padded {n_real / t_pad:.0f} tok/s ({n_real / n_pad:.0%} real) | "
          f"packed {n_real / t_pack:.0f} tok/s in {len(rows)} rows ({n_real / (1024 * len(rows)):.0%} real) | "
          f"packed/padded {t_pad / t_pack:.2f}x")
    return t_pad / t_pack


def _loss_peak_child(mode: str, n_tokens: int):
    """Runs in a fresh process: peak RSS growth of one loss forward+backward over n_tokens with the real vocab."""
    torch.manual_seed(0)
    hidden, vocab = 256, 151936
    lm_head = torch.nn.Linear(hidden, vocab, bias=False)
    h = torch.randn(n_tokens, hidden, requires_grad=True)
    y = torch.randint(0, vocab, (n_tokens,))
    holder = M.Ovis25.__new__(M.Ovis25)  # only chunked_ce's use of self.llm.lm_head is needed
    torch.nn.Module.__init__(holder)
    holder.llm = torch.nn.Module()
    holder.llm.lm_head = lm_head
    with open("/proc/self/statm") as f:  # current resident set (pages); ru_maxrss below is the high-water mark
        base = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024
    if mode == "chunked":
        loss, _ = M.Ovis25.chunked_ce(holder, h, y)
    else:  # what a plain HF loss does: all logits in fp32, then cross-entropy
        loss = torch.nn.functional.cross_entropy(lm_head(h).float(), y, reduction="sum")
    loss.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"mode": mode, "peak_mib": (peak - base) / 1024, "loss": loss.item()}))


def bench_loss_memory(n_tokens=8192):
    res = {}
    for mode in ("full", "chunked"):
        out = subprocess.run([sys.executable, __file__, "_loss_child", mode, str(n_tokens)], capture_output=True,
                             text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
        res[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    ratio = res["chunked"]["peak_mib"] / res["full"]["peak_mib"]
    assert abs(res["chunked"]["loss"] - res["full"]["loss"]) / res["full"]["loss"] < 1e-4
    print(f"loss memory at {n_tokens} tokens, vocab 151936: full logits +{res['full']['peak_mib']:.0f} MiB | "
          f"chunked ({M.Ovis25.loss_chunk_size}/chunk) +{res['chunked']['peak_mib']:.0f} MiB | "
          f"chunked/full {ratio:.2f}x")
    return ratio


def bench_sft():
    """sft.py on the bundled demo data (tiny model, one epoch, one process), twice on the same data: packed rows of
    up to 1024 tokens vs one sample per micro-batch (max_tokens=1: every sample is its own row, the seed's way)."""
    import tempfile

    res = {}
    for name, max_tokens in (("one sample/micro-batch", 1), ("packed", 1024)):
        out = tempfile.mkdtemp(prefix="bench_sft_")
        subprocess.run([sys.executable, "sft.py", "--config", "configs/demo_sft.json", "--epochs=1",
                        f"--max_tokens={max_tokens}", f"--output_dir={out}", "--eval_data_path=",
                        "--save_interval=100000"], check=True, capture_output=True,
                       env={**os.environ, "DS_ACCELERATOR": "cpu"}, cwd=os.path.dirname(os.path.abspath(__file__)))
        with open(os.path.join(out, "metrics.jsonl")) as f:
            rec = [json.loads(line) for line in f][1:]  # the first step includes warm-up
        tokens = sum(r["tokens_per_s"] * r["time_s"] for r in rec)
        seen = sum(r["tokens_per_s"] * r["time_s"] / r["real_token_frac"] for r in rec)
        res[name] = (tokens / sum(r["time_s"] for r in rec), tokens / seen, len(rec) + 1)
        print(f"sft {name}: {res[name][0]:.0f} tok/s, {res[name][1]:.1%} real tokens, {res[name][2]} steps")
    ratio = res["packed"][0] / res["one sample/micro-batch"][0]
    print(f"sft: packed/one-sample {ratio:.2f}x tokens/s (target >= 1.5x), real tokens {res['packed'][1]:.1%} "
          "(target >= 97%)")
    return ratio


def bench_lora():
    """lora.py vs sft.py, one epoch each on the demo data, same model: a 103M-param Ovis2.5 (8 layers of 512, the
    real vocab, tied) so the layers are not dwarfed by a toy's embedding. Optimizer-state bytes are measured as the
    size of the resumable checkpoint's optimizer files (fp32 master + two Adam moments of what trains). Then the
    exact trainable-parameter counts of Ovis2.5-9B (its real config, built on the meta device) with the defaults."""
    import shutil
    import tempfile

    from peft import get_peft_model

    import lora

    root = os.path.dirname(os.path.abspath(__file__))
    mdir = tempfile.mkdtemp(prefix="bench_lora_model_")
    cfg = json.loads(json.dumps(BENCH_CONFIG))
    cfg["llm_config"]["vocab_size"] = 151936  # the demo data uses the real tokenizer
    with open(os.path.join(root, "assets", "tiny", "config.json")) as f:
        full_cfg = json.load(f)
    full_cfg["hidden_size"], full_cfg["visual_vocab_size"] = cfg["hidden_size"], cfg["visual_vocab_size"]
    full_cfg["llm_config"].update(cfg["llm_config"])
    for fn in M.AUX_FILES:
        if os.path.exists(os.path.join(root, "assets", "tiny", fn)):
            shutil.copy(os.path.join(root, "assets", "tiny", fn), mdir)
    with open(os.path.join(mdir, "config.json"), "w") as f:
        json.dump(full_cfg, f)
    res = {}
    for script in ("sft.py", "lora.py"):
        out = tempfile.mkdtemp(prefix="bench_lora_")
        extra = ["--modules_to_save=", "--lora_r=16", "--lora_alpha=32"] if script == "lora.py" else []
        r = subprocess.run([sys.executable, script, "--config", "configs/demo_sft.json" if script == "sft.py" else
                            "configs/demo_lora.json", f"--model_path={mdir}", "--epochs=1", f"--output_dir={out}",
                            "--eval_data_path=", "--lr=1e-4", *extra], check=True, capture_output=True, text=True,
                           env={**os.environ, "DS_ACCELERATOR": "cpu"}, cwd=root)
        line = next(x for x in r.stdout.splitlines() if "trainable" in x)
        with open(os.path.join(out, "metrics.jsonl")) as f:
            rec = [json.loads(x) for x in f][1:]  # the first step includes warm-up
        ck = os.path.join(out, "checkpoints")
        opt = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(ck) for f in fs if "optim" in f)
        res[script] = (line.split("|")[1].strip(), opt, sum(r["time_s"] for r in rec) / len(rec),
                       max(r["mem_gb"] for r in rec))
        print(f"{script}: {res[script][0]} | optimizer state {opt / 2**20:.1f} MiB | step {res[script][2]:.2f} s | "
              f"peak RSS {res[script][3]:.2f} GB")
    s, lo = res["sft.py"], res["lora.py"]
    print(f"lora/full: optimizer state {lo[1] / s[1]:.3f}x, step time {lo[2] / s[2]:.2f}x, "
          f"peak RSS {lo[3] / s[3]:.2f}x")
    with open(os.path.join(root, "configs", "ovis25_9b_config.json")) as f:
        c9 = M.OvisConfig.from_dict(json.load(f))
    for r_ in (16, 64):
        with torch.device("meta"):
            m9 = M.Ovis25(c9, "sdpa")
        n_full = sum(p.numel() for p in m9.parameters())
        pm = get_peft_model(m9, lora.lora_config(lora.Config(lora_r=r_), m9.config))
        n = sum(p.numel() for p in pm.parameters() if p.requires_grad)
        print(f"Ovis2.5-9B: LoRA r {r_} trains {n / 1e6:.1f}M of {n_full / 1e9:.2f}B params ({n / n_full:.2%}): "
              f"Adam + fp32 master {n * 12 / 2**30:.1f} GiB vs {n_full * 12 / 2**30:.0f} GiB for full SFT")
    return lo[1] / s[1]


def bench_rollout(group: int = 8, side: int = 1792, new_tokens: int = 64) -> float:
    """GRPO's rollouts of one image-heavy prompt: a side x side photo at the official budget (1792 px: 3136 visual
    tokens), `group` sampled completions of `new_tokens` each through tools.run_tool_loop, the group sharing one ViT
    pass and one prefill (group=G, the KV cache copied) vs the prompt repeated G times. The same generator seed:
    the tokens must be identical."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    m = M.Ovis25.from_config(BENCH_CONFIG, device=dev).eval()
    tok = M.load_tokenizer(os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "tiny"))
    g = torch.Generator().manual_seed(0)
    img = Image.fromarray(torch.randint(0, 256, (side, side, 3), generator=g, dtype=torch.uint8).numpy())
    pv, grid = M.preprocess_image(img, 448 * 448, 1792 * 1792)
    ids = M.expand_placeholders(torch.randint(0, 8000, (64,), generator=g).tolist() + [M.IMAGE_TOKEN_ID], grid)
    prompt = {"input_ids": torch.tensor([ids]), "pixel_values": pv, "grid_thws": grid}
    kw = dict(max_new_tokens=new_tokens, do_sample=True, eos_token_ids=())  # no end token: every row runs in full

    def run(shared: bool):
        n, gen = (1, group) if shared else (group, 1)
        t0 = time.perf_counter()
        out = tools.run_tool_loop(m, tok, [prompt] * n, images=[[img]] * n, keys=[["img"]] * n, group=gen,
                                  generator=torch.Generator(dev).manual_seed(1), **kw)
        return time.perf_counter() - t0, [r.token_ids for r in out]

    with torch.no_grad():
        run(True)  # warm-up
        t_sh, a = run(True)
        t_un, b = run(False)
    print(f"grpo rollouts ({dev}): {group} completions x {new_tokens} tokens of a {side}px prompt ({len(ids)} tokens) "
          f"| shared prompt {t_sh:.2f}s, prompt per completion {t_un:.2f}s: {t_un / t_sh:.2f}x (target >= 1.5x) | "
          f"same tokens: {a == b}")
    return t_un / t_sh


def bench_grpo(steps: int = 6):
    """grpo.py with configs/demo_grpo.json (its start model, real Crop calls, its prompts x completions per step) for
    a few steps: generated tokens per second of rollout, and where the step time goes."""
    import tempfile

    root = os.path.dirname(os.path.abspath(__file__))
    run = json.load(open(os.path.join(root, "configs", "demo_grpo.json")))
    if not os.path.exists(os.path.join(root, run["model_path"], "config.json")):
        print(f"bench grpo steps start from {run['model_path']}: run `python sft.py --config "
              "configs/demo_ground_sft.json` first")
        return None
    out = tempfile.mkdtemp(prefix="bench_grpo_")
    subprocess.run([sys.executable, "grpo.py", "--config", "configs/demo_grpo.json", f"--max_steps={steps}",
                    f"--output_dir={out}", "--save_interval=1000", "--eval_interval=0"], check=True,
                   capture_output=True, env={**os.environ, "DS_ACCELERATOR": "cpu"}, cwd=root)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rec = [json.loads(x) for x in f]
    roll, train = sum(r["rollout_s"] for r in rec), sum(r["train_s"] for r in rec)
    tok = sum(r["gen_tokens"] for r in rec)
    calls = sum(r["tool_calls_per_rollout"] for r in rec) / len(rec)
    print(f"grpo: {len(rec)} steps, {tok / roll:.0f} generated tok/s in rollouts, {calls:.2f} tool calls/rollout | "
          f"step time: rollout {roll / (roll + train):.0%}, training {train / (roll + train):.0%} | mean step "
          f"{(roll + train) / len(rec):.1f} s")
    return roll / (roll + train)


def bench_vllm(group: int = 16, new_tokens: int = 64, ckpt: str = "") -> dict:
    """Rollouts on the model path (tools.run_tool_loop, model.generate) vs on vLLM (vllm_engine.Engine), the same
    prompts: 2 GRPO demo prompts (configs/demo_grpo.json: its data, budgets, thinking) x `group` sampled completions
    with real tool calls, generated tokens per second each, and greedy rollouts compared token for token. `ckpt`
    (--model), else the GRPO demo's start model when there, else a random tiny one (LLM head_dim 64: vLLM's CPU
    runs it)."""
    import tempfile

    import data
    import grpo
    import vllm_engine

    root = os.path.dirname(os.path.abspath(__file__))
    run = json.load(open(os.path.join(root, "configs", "demo_grpo.json")))
    demo = os.path.join(root, run["image_dir"])
    ckpt = ckpt or os.path.join(root, run["model_path"])
    if not os.path.exists(os.path.join(ckpt, "config.json")):
        ckpt = os.path.join(tempfile.mkdtemp(prefix="bench_vllm_"), "tiny")
        M.Ovis25.from_config(json.load(open(os.path.join(root, "assets", "tiny", "config.json")))).save_pretrained(
            ckpt, source_dir=os.path.join(root, "assets", "tiny"))
    tok, m = M.load_tokenizer(ckpt), M.Ovis25.from_pretrained(ckpt).eval()
    cfg = grpo.Config(**{k: v for k, v in run.items() if k in grpo.Config.__dataclass_fields__})
    cfg.image_dir = demo
    reg = tools.load_tools(cfg.tools, cfg.bbox_format)
    samples = data.load_prompts([os.path.join(root, cfg.data_path)], demo, cfg.bbox_format)[:2]
    inputs = [grpo.prompt_inputs(s, cfg, tok, reg) for s in samples]
    kw = dict(images=[x[1] for x in inputs], keys=[x[2] for x in inputs], registry=reg, max_new_tokens=new_tokens,
              crop_min_pixels=cfg.crop_min_pixels, crop_max_pixels=cfg.crop_max_pixels)
    prompts = [x[0] for x in inputs]
    t0 = time.perf_counter()
    engine = vllm_engine.Engine(ckpt, max_model_len=4096)
    start = time.perf_counter() - t0

    def run(sampled: bool, on_vllm: bool):
        extra = dict(group=group, do_sample=True, temperature=1.0) if sampled else {}
        t = time.perf_counter()
        with torch.no_grad():
            out = engine.run_tool_loop(tok, prompts, seed=1, **kw, **extra) if on_vllm else \
                tools.run_tool_loop(m, tok, prompts, **kw, **extra)
        return sum(r.n_generated for r in out) / (time.perf_counter() - t), out

    ours, theirs = run(True, False), run(True, True)
    same = [a.token_ids for a in run(False, False)[1]] == [b.token_ids for b in run(False, True)[1]]
    res = {"model_tok_per_s": ours[0], "vllm_tok_per_s": theirs[0], "ratio": theirs[0] / ours[0],
           "greedy_equal": same, "vllm_start_s": start,
           "tool_calls_per_rollout": sum(len(r.tool_calls) for r in theirs[1]) / len(theirs[1])}
    print(f"grpo rollouts, 2 prompts x {group} sampled completions x <= {new_tokens} tokens ({ckpt}): model path "
          f"{ours[0]:.0f} tok/s, vLLM {theirs[0]:.0f} tok/s ({res['ratio']:.2f}x); greedy rollouts equal token for "
          f"token: {same}; vLLM start {start:.0f} s; {res['tool_calls_per_rollout']:.2f} tool calls per rollout")
    return res


def bench_serve(clients: int = 8, per_client: int = 4, max_tokens: int = 64, extra: tuple = (),
                model: str | None = None) -> dict:
    """infer.py --serve as an app meets it: `clients` concurrent clients x `per_client` requests (a demo image and
    question, tools and thinking on, greedy) against the same requests one by one: requests/s and p50 / p95 latency
    each, and the largest batch the server formed. `model` (default: the SFT demo's when it is there, else a random
    tiny one). extra: more infer.py flags (--use-vllm)."""
    import socket
    import tempfile
    import threading

    import httpx
    import openai

    root = os.path.dirname(os.path.abspath(__file__))
    ckpt = model or os.path.join(root, "out", "demo_sft", "final")
    if model is None and not os.path.exists(os.path.join(ckpt, "config.json")):
        ckpt = os.path.join(tempfile.mkdtemp(prefix="bench_serve_"), "tiny")
        M.Ovis25.from_config(json.load(open(os.path.join(root, "assets", "tiny", "config.json")))).save_pretrained(
            ckpt, source_dir=os.path.join(root, "assets", "tiny"))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "infer.py", "--model", ckpt, "--serve", "--port", str(port), "--tools",
                             "--enable-thinking", "--image-root", os.path.join(root, "data", "demo"),
                             "--batch-size", str(clients),
                             "--single-image-min-pixels", "4096", "--single-image-max-pixels", "20480",
                             "--crop-min-pixels", "4096", "--crop-max-pixels", "8192", *extra], cwd=root,
                            env={**os.environ, "DS_ACCELERATOR": "cpu"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(1200):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                if proc.poll() is not None:
                    raise SystemExit(f"the server exited ({proc.returncode}): run it by hand to see why") from None
                time.sleep(0.25)
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
        name = os.path.basename(ckpt.rstrip("/"))  # the server's default --served-model-name

        def ask(k: int) -> float:
            t = time.perf_counter()
            image = {"type": "image_url", "image_url": {"url": f"images/syn_{k % 8:03d}.png"}}
            client.chat.completions.create(model=name, temperature=0, max_tokens=max_tokens, messages=[
                {"role": "user", "content": [image, {"type": "text", "text": "What color is the small square?"}]}])
            return time.perf_counter() - t

        ask(0)  # warm-up
        n = clients * per_client
        t0 = time.perf_counter()
        alone = [ask(k) for k in range(n)]
        t_alone = time.perf_counter() - t0
        together: list = []

        def client_loop(c: int):
            for k in range(per_client):
                together.append(ask(c * per_client + k))

        threads = [threading.Thread(target=client_loop, args=(c,)) for c in range(clients)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        t_together = time.perf_counter() - t0
        largest = httpx.get(url + "/health", timeout=10).json()["largest_batch"]
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    q = lambda xs, p: sorted(xs)[min(len(xs) - 1, int(p * len(xs)))]  # noqa: E731
    res = {"requests": n, "alone_req_per_s": n / t_alone, "concurrent_req_per_s": n / t_together,
           "throughput_ratio": t_alone / t_together, "alone_p50_s": q(alone, 0.5), "alone_p95_s": q(alone, 0.95),
           "concurrent_p50_s": q(together, 0.5), "concurrent_p95_s": q(together, 0.95), "largest_batch": largest}
    print(f"serve ({'vLLM' if extra else 'model path'}, {ckpt}): {clients} clients x {per_client} requests: "
          f"{res['concurrent_req_per_s']:.2f} req/s vs {res['alone_req_per_s']:.2f} one by one "
          f"({res['throughput_ratio']:.2f}x); latency p50 / p95 {res['concurrent_p50_s']:.2f} / "
          f"{res['concurrent_p95_s']:.2f} s vs {res['alone_p50_s']:.2f} / {res['alone_p95_s']:.2f} s; batches of "
          f"up to {largest}")
    return res


def bench_infer(turn_tokens: int = 32, n_calls: int = 3, side: int = 1792, crop: int = 600, rows: int = 1):
    """A 3-tool-call trajectory as the tool loop runs it (tools.run_tool_loop): prompt (text + one 448x448 image)
    -> generate -> Crop -> generate -> Crop -> generate -> Crop -> generate. Each round's generation is fixed to
    `turn_tokens` tokens (a random model never writes `</tool_call>` on cue); each Crop is executed by the registry
    and appended with tools.tool_result_ids / tool_result_pixels, exactly the loop's per-round calls. Two ways:
    continuing from the KV cache (state=...) vs re-prefilling the whole sequence with every image each round.
    Defaults: one row, a photo at Ovis2.5's max_pixels (1792 px, 3136 visual tokens), 600 px crops (~340 tokens
    each at the crop budget), 32 tokens per turn. The ratio falls as turns get longer (decode dominates) and rises
    with rows (GRPO's num_generations re-prefill every row): `python bench.py infer 128 3 1792 600 4`
    = turn_tokens n_calls side crop rows."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    m = M.Ovis25.from_config(BENCH_CONFIG, device=dev).eval()
    vit = m.config.vit
    g = torch.Generator().manual_seed(0)
    img = Image.fromarray(torch.randint(0, 256, (side, side, 3), generator=g, dtype=torch.uint8).numpy())
    pv0, g0 = M.preprocess_image(img, side * side, side * side)
    prompt = M.expand_placeholders(torch.randint(0, 8000, (64,), generator=g).tolist() + [M.IMAGE_TOKEN_ID], g0)
    registry = tools.load_tools()
    crops = []
    for k in range(n_calls):  # real Crop calls on the image, rendered as the loop renders them
        res = registry.execute(f"Crop [{40 * k}, {30 * k}, {40 * k + crop}, {30 * k + crop}]", [img], ["bench"])
        p, gg = tools.tool_result_pixels(res, tools.CROP_MIN_PIXELS, tools.CROP_MAX_PIXELS, vit.patch_size,
                                        vit.hidden_stride)
        crops.append((M.expand_placeholders([M.IMAGE_TOKEN_ID], gg, vit.hidden_stride), p, gg))
    kw = dict(max_new_tokens=turn_tokens, do_sample=False, eos_token_ids=())

    def run(kv: bool):
        seq, pvs, gs, n_gen = list(prompt), [pv0], [g0], 0
        new, st = m.generate(torch.tensor([seq] * rows, device=dev), torch.cat([pv0] * rows).to(dev),
                             torch.cat([g0] * rows).to(dev), return_state=True, **kw)
        for ids, p, gg in crops:
            seq, pvs, gs, n_gen = seq + new[0].tolist() + ids, pvs + [p], gs + [gg], n_gen + new.numel()
            if kv:
                new, st = m.generate(torch.tensor([ids] * rows, device=dev), torch.cat([p] * rows).to(dev),
                                     torch.cat([gg] * rows).to(dev), state=st, return_state=True, **kw)
            else:
                new = m.generate(torch.tensor([seq] * rows, device=dev), torch.cat(pvs * rows).to(dev),
                                 torch.cat(gs * rows).to(dev), **kw)
        return seq + new[0].tolist(), n_gen + new.numel()

    with torch.no_grad():
        m.generate(torch.tensor([prompt[:8]], device=dev), max_new_tokens=4, do_sample=False)  # warm-up
        t0 = time.perf_counter()
        seq_kv, n_gen = run(True)
        t_kv = time.perf_counter() - t0
        t0 = time.perf_counter()
        seq_re, _ = run(False)
        t_re = time.perf_counter() - t0
    same = seq_kv == seq_re
    print(f"infer ({dev}): {rows} rows x {n_calls}-Crop trajectory of {len(seq_kv)} tokens ({side}px image, "
          f"{crop}px crops, {turn_tokens} tokens/turn, {n_gen} generated) | KV continuation "
          f"{t_kv:.2f}s, re-prefill per turn {t_re:.2f}s: {t_re / t_kv:.2f}x (target >= 2x) | generation "
          f"{n_gen / t_kv:.0f} tok/s | same tokens: {same}")
    return t_re / t_kv


# ----------------------------------------------------------------------------------------------------------------
def _picture_child(tsv: str):
    """Runs in a fresh process: the RSS growth of one picture on infer.py --bench's path at the default budgets:
    the TSV row decoded into the cache (evalsets.load), the picture opened (infer._request), then resized and cut into
    patches for the first pass (model.build_inputs). Peaks: the kernel's high-water mark, reset at the start (what
    imports left behind does not count); `held`: what stays while the question is answered (the crops' original)."""
    import data
    import evalsets
    import infer

    tok = M.load_tokenizer(os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "tiny"))
    mib = lambda key: int(re.search(rf"{key}:\s+(\d+)", open("/proc/self/status").read()).group(1)) / 1024  # noqa: E731
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    base, out = mib("VmRSS"), {}
    req = evalsets.load("hrbench8k", tsv, cache_dir=os.path.dirname(tsv))[0][0]
    out["load_peak"] = mib("VmHWM") - base
    msgs, images, _ = infer._request(req, ".", data.Budgets())
    out["decode_peak"] = mib("VmHWM") - base
    inputs = M.build_inputs(msgs, tok, False, True, *data.Budgets().originals(1, False))
    out.update(total_peak=mib("VmHWM") - base, held=mib("VmRSS") - base, size=images[0].size,
               grid=inputs["grid_thws"][0].tolist())
    print(json.dumps(out))


def bench_picture(width: int = 7680, height: int = 4320):
    """A photo-like JPEG of HR-Bench 8K's size in a one-row HR-Bench TSV, measured by _picture_child (MiB)."""
    import base64
    import io
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        torch.manual_seed(0)
        small = Image.fromarray((torch.rand(height // 32, width // 32, 3) * 255).byte().numpy())
        buf = io.BytesIO()
        small.resize((width, height), Image.BICUBIC).save(buf, "JPEG", quality=90)
        with open(os.path.join(d, "hr_bench_8k.tsv"), "w") as f:
            f.write("index\tquestion\tanswer\tcategory\tA\tB\tC\tD\tcycle_category\timage\n"
                    f"0\tWhat?\tA\tsingle\ta\tb\tc\td\tc0\t{base64.b64encode(buf.getvalue()).decode()}\n")
        out = subprocess.run([sys.executable, __file__, "_picture_child", f.name], capture_output=True, text=True,
                             check=True)
    res = {**json.loads(out.stdout.strip().splitlines()[-1]), "jpeg_mib": len(buf.getvalue()) / 2**20}
    print(f"picture {res['size']} (JPEG {res['jpeg_mib']:.1f} MiB) on --bench's path, default budgets (grid "
          f"{res['grid']}): peak RSS growth {res['load_peak']:.0f} MiB loading the TSV row, {res['decode_peak']:.0f} "
          f"MiB decoding, {res['total_peak']:.0f} MiB with the first pass's resize; {res['held']:.0f} MiB held")
    return res


# python bench.py gpu: one command for a GPU machine (python bench.py gpu --smoke: the same parts, tiny, on a CPU)

PEAK_BF16 = {"H200": 989.4e12, "H100": 989.4e12, "A100": 312e12, "L40S": 362e12}  # dense bf16 FLOP/s, datasheets


def ovis25_2b_config() -> dict:
    """Ovis2.5-2B's shapes: the 9B's config.json (configs/ovis25_9b_config.json, the released file) with the LLM of
    Qwen3-1.7B (spec 2.4: hidden 2048, 6144, 28 layers, 16 heads, 8 KV heads, head_dim 128, tied embeddings)."""
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "ovis25_9b_config.json")) as f:
        cfg = json.load(f)
    cfg["llm_config"].update(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                             num_key_value_heads=8, head_dim=128, max_window_layers=28, tie_word_embeddings=True)
    return {**cfg, "hidden_size": 2048}


def _set_attention(m, attn: str):
    """Switch a built model's attention (same weights) between varlen, sdpa and eager."""
    m.attn = attn
    m.config.llm._attn_implementation = "ovis_varlen" if attn == "varlen" else attn
    for mod in m.modules():
        if hasattr(mod, "kernel") and hasattr(mod, "attn"):
            mod.attn = attn


def _rows(n_rows: int, row_tokens: int, seed: int, max_sample: int = 1024, side: int = 256):
    """Packed rows of synthetic samples of <= max_sample tokens, each an image (side x side) and text: input ids,
    labels, position ids restarting per sample, pixels and grids."""
    g = torch.Generator().manual_seed(seed)
    ids, pos, pvs, grids = [], [], [], []
    pv1, g1 = M.preprocess_image(Image.new("RGB", (side, side), (90, 120, 200)), side * side, side * side)
    n_img = M.num_visual_tokens(g1[0]) + 2
    for _ in range(n_rows):
        row, p = [], []
        while len(row) < row_tokens:
            n = min(int(torch.randint(n_img + 64, max_sample + 1, (1,), generator=g)), row_tokens - len(row))
            if n < n_img + 8:
                n = row_tokens - len(row)
                sample = torch.randint(0, 150000, (n,), generator=g).tolist()
            else:
                sample = M.expand_placeholders([M.IMAGE_TOKEN_ID] + torch.randint(0, 150000, (n - n_img,),
                                                                                  generator=g).tolist(), g1)
                pvs.append(pv1)
                grids.append(g1)
            row, p = row + sample, p + list(range(len(sample)))
        ids.append(row)
        pos.append(p)
    ids = torch.tensor(ids)
    return {"input_ids": ids, "labels": torch.where(ids >= 0, ids, M.IGNORE_ID), "position_ids": torch.tensor(pos),
            "pixel_values": torch.cat(pvs) if pvs else None, "grid_thws": torch.cat(grids) if grids else None}


def _train_flops(cfg: dict, mb: dict) -> float:
    """Model FLOPs of one forward + backward: 6 N per token (LLM matmuls + lm_head; ViT + head per patch) plus causal
    attention 6 L^2 H d per layer for each sample (no recompute counted, as MFU conventions do)."""
    llm, vit = cfg["llm_config"], cfg["vit_config"]
    h, d, heads, kv = llm["hidden_size"], llm["head_dim"], llm["num_attention_heads"], llm["num_key_value_heads"]
    per_layer = h * d * (2 * heads + 2 * kv) + 3 * h * llm["intermediate_size"]
    n_llm = llm["num_hidden_layers"] * per_layer + h * llm["vocab_size"]
    dv = vit["hidden_size"]
    n_vit = vit["num_hidden_layers"] * (4 * dv * dv + 2 * dv * vit["intermediate_size"]) + \
        4 * dv * (cfg["visual_vocab_size"] - 4)
    pos = mb["position_ids"].reshape(-1)
    starts = torch.nonzero(pos == 0).reshape(-1).tolist() + [len(pos)]
    lens = [b - a for a, b in zip(starts, starts[1:])]
    patches = int(mb["grid_thws"].prod(-1).sum()) if mb["grid_thws"] is not None else 0
    return (6 * n_llm * len(pos) + 6 * llm["num_hidden_layers"] * heads * d * sum(n * n for n in lens)
            + 6 * n_vit * patches)


def bench_gpu(smoke: bool = False) -> dict:
    """Parts (a)-(e) of the GPU validation, each timed on its own; a failing part is reported, not fatal. One JSON
    line (also written to bench_gpu.json): (a) varlen vs SDPA vs eager logits on packed multimodal rows, packed ==
    separate; (b) sft steps through a DeepSpeed ZeRO-2 engine at 8k / 16k-token rows: tokens/s, MFU, peak memory,
    varlen vs SDPA; (c) a LoRA step; (d) generation tokens/s at batch 1 and 16 (KV cache); (e) one GRPO step."""
    import deepspeed
    from peft import get_peft_model

    import lora  # a benchmark may use the stage scripts' helpers

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    cfg = json.load(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "tiny", "config.json"))) \
        if smoke else ovis25_2b_config()
    rows = (256, 512) if smoke else (8192, 16384)
    out = {"device": name, "model": "tiny (smoke)" if smoke else "Ovis2.5-2B shapes, random bf16 (ovis25_2b_config)",
           "peak_bf16_flops": peak, "attention": M.attention_paths("", dev, torch.bfloat16)}

    def part(key, fn):
        t0 = time.perf_counter()
        try:
            out[key] = fn()
        except Exception as e:  # noqa: BLE001 (reported, the next part still runs)
            out[key] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        out[key]["seconds"] = round(time.perf_counter() - t0, 1)
        if dev == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    common.setup_distributed(600)  # one process: the DeepSpeed engine of part (b) needs a process group
    def first_len(pos: torch.Tensor) -> int:  # length of a packed row's first sample
        restarts = torch.nonzero(pos[1:] == 0).reshape(-1)
        return int(restarts[0]) + 1 if len(restarts) else len(pos)

    torch.manual_seed(0)
    with torch.device(dev):
        m = M.Ovis25(M.OvisConfig.from_dict(cfg), "varlen")
    m = m.to(torch.bfloat16)
    cuda = lambda t: {k: v.to(dev) if torch.is_tensor(v) else v for k, v in t.items()}  # noqa: E731

    def logits_agree():
        mb = cuda(_rows(2, rows[0] // 2, 0, max_sample=512))
        res = {}
        with torch.no_grad():
            for attn in ("varlen", "sdpa", "eager"):
                _set_attention(m, attn)
                res[attn] = m(mb["input_ids"], pixel_values=mb["pixel_values"], grid_thws=mb["grid_thws"],
                              position_ids=mb["position_ids"]).logits.float()
            _set_attention(m, "varlen")
            n = first_len(mb["position_ids"][0])  # the first sample of row 0, alone
            n_pix = int(mb["grid_thws"][0].prod())  # the first image's patches (t * h * w)
            alone = m(mb["input_ids"][:1, :n], pixel_values=mb["pixel_values"][:n_pix],
                      grid_thws=mb["grid_thws"][:1]).logits.float()[0]
        d = {f"varlen_vs_{o}": {"max_abs_diff": (res["varlen"] - res[o]).abs().max().item(), "argmax_agree":
             (res["varlen"].argmax(-1) == res[o].argmax(-1)).float().mean().item()} for o in ("sdpa", "eager")}
        return {**d, "packed_vs_separate_max_abs_diff": (res["varlen"][0, :n] - alone).abs().max().item()}

    def sft_steps():
        res = {}
        for attn in ("varlen", "sdpa"):
            _set_attention(m, attn)
            m.gradient_checkpointing_enable()
            m.train()
            opt = torch.optim.AdamW(m.parameters(), lr=1e-5, fused=dev == "cuda")
            eng = deepspeed.initialize(model=m, optimizer=opt, config={
                "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
                "bf16": {"enabled": dev == "cuda"}, "zero_optimization": {"stage": 2 if dev == "cuda" else 0}})[0]
            for t in rows:
                mb = cuda(_rows(1, t, t))
                times = []
                for _ in range(4):  # 1 warm-up + 3 timed
                    t0 = time.perf_counter()
                    loss = eng(**mb, loss_reduction="mean").loss
                    eng.backward(loss)
                    eng.step()
                    torch.cuda.synchronize() if dev == "cuda" else None
                    times.append(time.perf_counter() - t0)
                dt = sorted(times[1:])[1]
                r = {"tokens_per_s": t / dt, "step_s": dt, "loss": loss.item(),
                     "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else None}
                r["mfu"] = _train_flops(cfg, mb) / dt / peak if peak else None
                res[f"{attn}_{t}"] = r
            del eng, opt
        return {**res, **{f"varlen_over_sdpa_{t}": res[f"varlen_{t}"]["tokens_per_s"] / res[f"sdpa_{t}"]["tokens_per_s"]
                          for t in rows}}

    def lora_step():
        _set_attention(m, "varlen")
        pm = get_peft_model(m, lora.lora_config(lora.Config(lora_r=16), m.config))
        opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-4)
        mb, times = cuda(_rows(1, rows[0], 1)), []
        for _ in range(3):
            t0 = time.perf_counter()
            pm(**mb).loss.backward()
            opt.step()
            opt.zero_grad()
            torch.cuda.synchronize() if dev == "cuda" else None
            times.append(time.perf_counter() - t0)
        pm.unload()
        return {"tokens_per_s": rows[0] / min(times[1:]), "trainable": sum(p.numel() for p in opt.param_groups[0][
            "params"]), "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else None}

    def generation():
        m.eval()
        res = {}
        mb = cuda(_rows(1, 512, 2, max_sample=512))
        first = first_len(mb["position_ids"][0])
        n_pix = int(mb["grid_thws"][0].prod())  # the first image's patches (t * h * w)
        for b in (1, 16):
            ids = mb["input_ids"][:, :first].expand(b, -1)
            with torch.no_grad():
                t0 = time.perf_counter()
                new = m.generate(ids, mb["pixel_values"][:n_pix].repeat(b, 1), mb["grid_thws"][:1].repeat(b, 1),
                                 max_new_tokens=32 if smoke else 128, eos_token_ids=())
                torch.cuda.synchronize() if dev == "cuda" else None
            res[f"batch_{b}_tokens_per_s"] = new.numel() / (time.perf_counter() - t0)
        return res

    def grpo_step():
        """8 completions of one image prompt through the tool loop (shared prefill), scored, one clipped update."""
        import grpo

        tok = M.load_tokenizer(os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "tiny"))
        img = Image.new("RGB", (448, 448), (30, 160, 90))
        reg = tools.load_tools()
        msgs = [{"role": "system", "content": reg.system_prompt()},
                {"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "Color?"}]}]
        inp = M.build_inputs(msgs, tok, enable_thinking=True)
        m.eval()
        t0 = time.perf_counter()
        with torch.no_grad():
            rolls = tools.run_tool_loop(m, tok, [cuda(inp)], images=[[img]], keys=[["img"]], registry=reg, group=8,
                                        do_sample=True, max_new_tokens=32 if smoke else 128)
        t_roll = time.perf_counter() - t0
        m.train()
        opt = torch.optim.AdamW([p for p in m.llm.parameters()], lr=1e-6)
        mb = tools.pack_rollouts(rolls, dev)
        logp = grpo.token_logps(m, mb, 1.0)
        adv = torch.randn(len(logp), device=dev)
        cfg_ = grpo.Config(model_path="x", data_path="x")
        loss, _ = grpo.policy_loss(logp, logp.detach(), None, adv, torch.full_like(adv, 1 / len(adv)), cfg_)
        loss.backward()
        opt.step()
        opt.zero_grad()
        torch.cuda.synchronize() if dev == "cuda" else None
        return {"rollout_s": t_roll, "update_s": time.perf_counter() - t0 - t_roll, "completions": len(rolls),
                "generated_tokens": sum(r.n_generated for r in rolls),
                "tool_calls": sum(len(r.tool_calls) for r in rolls)}

    def vllm_rollouts():
        """The same kind of rollouts (8 completions of one image prompt, tools on, 16 prompts) on the model path and
        on vLLM over an export of the same weights: generated tokens/s each (target: vLLM >= 3x), and how many
        leading tokens of a greedy rollout agree (bf16: long runs drift apart in rounding; fp32 on CPU: all, as
        tests/test_vllm.py asserts)."""
        import tempfile

        import vllm_engine

        tiny = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "tiny")
        d = os.path.join(tempfile.mkdtemp(prefix="bench_vllm_"), "m")
        m.save_pretrained(d, source_dir=tiny)
        tok = M.load_tokenizer(tiny)
        reg = tools.load_tools()
        img = Image.new("RGB", (896, 672), (30, 160, 90))
        msgs = [{"role": "system", "content": reg.system_prompt()},
                {"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "Color?"}]}]
        inp = M.build_inputs(msgs, tok, enable_thinking=True)
        n, kw = (2 if smoke else 16), dict(registry=reg, max_new_tokens=32 if smoke else 256, group=8,
                                           do_sample=True)
        eng = vllm_engine.Engine(d, max_model_len=8192, dtype="bfloat16" if dev == "cuda" else "float32")
        m.eval()
        res = {}
        for name, fn in (("model", lambda: tools.run_tool_loop(m, tok, [cuda(inp)] * n, images=[[img]] * n,
                                                                 keys=[["img"]] * n, **kw)),
                         ("vllm", lambda: eng.run_tool_loop(tok, [inp] * n, images=[[img]] * n, keys=[["img"]] * n,
                                                            seed=0, **kw))):
            t0 = time.perf_counter()
            with torch.no_grad():
                rolls = fn()
            res[f"{name}_tokens_per_s"] = sum(r.n_generated for r in rolls) / (time.perf_counter() - t0)
        res["ratio"] = res["vllm_tokens_per_s"] / res["model_tokens_per_s"]
        greedy = dict(images=[[img]], keys=[["img"]], registry=reg, max_new_tokens=64)
        with torch.no_grad():
            ours = tools.run_tool_loop(m, tok, [cuda(inp)], **greedy)[0]
        theirs = eng.run_tool_loop(tok, [inp], **greedy)[0]
        sampled = [[t for t, g in zip(r.token_ids, r.gen_mask) if g] for r in (ours, theirs)]
        same = [a == b for a, b in zip(*sampled)] + [False]
        res["greedy_tokens_agreeing"] = f"{same.index(False)} of {max(map(len, sampled))}"
        return res

    for key, fn in (("a_logits", logits_agree), ("b_sft", sft_steps), ("c_lora", lora_step),
                    ("d_generation", generation), ("e_grpo", grpo_step), ("f_vllm_rollouts", vllm_rollouts)):
        part(key, fn)
    line = json.dumps(out)
    print(line)
    with open("bench_gpu.json", "w") as f:
        f.write(line + "\n")
    return out


def _opt(name: str, default):
    """The value after flag `name` on the command line, or `default` without the flag."""
    if name not in sys.argv:
        return default
    i = sys.argv.index(name) + 1
    if i >= len(sys.argv) or sys.argv[i].startswith("--"):
        sys.exit(f"bench.py: {name} needs a value")
    return sys.argv[i]


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "model"
    if what == "_loss_child":
        _loss_peak_child(sys.argv[2], int(sys.argv[3]))
    elif what == "model":
        torch.set_num_threads(os.cpu_count() or 1)
        speed, mem = bench_packing(), bench_loss_memory()
        print(f"model: packed/padded {speed:.2f}x (target >= 1.3x) | chunked/full loss memory {mem:.2f}x "
              f"(target <= 0.25x)")
    elif what == "sft":
        bench_sft()
    elif what == "lora":
        bench_lora()
    elif what == "grpo":
        torch.set_num_threads(os.cpu_count() or 1)
        model_dir = _opt("--model", "")
        bench_rollout()
        if "--vllm-only" not in sys.argv:
            bench_grpo()
        bench_vllm(ckpt=model_dir)
    elif what == "gpu":
        bench_gpu(smoke="--smoke" in sys.argv)
    elif what == "serve":
        bench_serve(int(_opt("--clients", 8)), int(_opt("--requests", 4)), extra=("--use-vllm",) if "--use-vllm" in
                    sys.argv else (), model=_opt("--model", None))
    elif what == "_picture_child":
        _picture_child(sys.argv[2])
    elif what == "picture":
        bench_picture()
    elif what == "infer":
        torch.set_num_threads(os.cpu_count() or 1)
        bench_infer(*map(int, sys.argv[2:]))
    else:
        sys.exit(f"unknown benchmark {what!r}; choose from: model, sft, infer, lora, grpo, serve, gpu")
