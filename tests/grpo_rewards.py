"""Custom GRPO rewards for the tests, loaded by dotted path (`rewards: "tests.grpo_rewards.even_ids:1"`)."""


def even_ids(rollout, sample) -> float:
    """An easy verifiable reward a random tiny model can climb: the share of sampled tokens with an even id."""
    ids = [t for t, m in zip(rollout.token_ids, rollout.gen_mask) if m]
    return sum(t % 2 == 0 for t in ids) / max(len(ids), 1)


def half_flat(rollout, sample) -> float:
    """No signal on prompts whose id ends in an even digit (every completion gets 0.5), even_ids on the others."""
    return 0.5 if int(str(sample.get("id"))[-1]) % 2 == 0 else even_ids(rollout, sample)


def no_tools(rollout, sample) -> float:
    """Pays for NOT calling a tool: a policy that learns it stops using its tools (the collapse the guard catches)."""
    return float(not rollout.tool_calls)
