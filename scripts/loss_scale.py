"""Where the grad clips bind: the loss scales a config uses, and the clips they amount to.

    python scripts/loss_scale.py experiment=relift_qwen_math_7b trainer=fsdp_8gpu

The losses here are normalised by global counts (means over the whole mini-batch), so they do not
depend on the world size or the micro-batching; the ReLIFT reference's per-GPU losses are sums
over that GPU's sequences (RL) or a fraction of a mean (SFT), so its gradients are a constant
multiple of these and its clips bind elsewhere. ``algorithm.rl_loss_scale`` / ``sft_loss_scale``
multiply the loss before backward to put the clips where the reference's bind; with AdamW nothing
else sees the scale but Adam's eps, which stays as negligible as in the reference.
"""

from __future__ import annotations

import argparse

from plan_memory import compose_config


def explain(cfg, reference_gpus: int, prompt_tokens: int, response_tokens: int) -> list[str]:
    """Lines that derive each scale from the config and the reference's layout."""
    algo = cfg.algorithm
    rollouts = cfg.data.batch_size * algo.group_size // algo.num_mini_batches
    per_gpu = rollouts / reference_gpus
    rl_scale, sft_scale = algo.rl_loss_scale, algo.sft_loss_scale
    lines = [
        f"RL: a mini-batch of {rollouts} rollouts ({cfg.data.batch_size} prompts x G="
        f"{algo.group_size} / {algo.num_mini_batches} mini-batches); the loss is their mean "
        f"(agg_mode {algo.pg_loss.agg_mode}), x rl_loss_scale={rl_scale:g} before backward.",
        f"  The reference's GPUs each sum their {per_gpu:g} rollouts' losses (gradient accumulation "
        f"1) and FSDP averages its {reference_gpus} GPUs: {per_gpu:g} x the mean.",
        f"  rl_grad_clip={algo.rl_grad_clip:g} on the scaled gradient = {algo.rl_grad_clip / rl_scale:.4g} "
        f"on the mean's (the reference's scale needs rl_loss_scale={per_gpu:g}).",
    ]
    sft = algo.sft_loss
    if sft.agg_mode == "group_token_mean":
        groups = -(-algo.buffer_threshold // sft.group_rows)
        lines += [
            f"SFT: the mean over {groups} groups of {sft.group_rows} demonstrations of their token "
            f"mean, x sft_loss_scale={sft_scale:g}.",
            f"  The reference's GPUs each divide their micro-batches of {sft.group_rows} by all "
            f"{groups} micro-batches (sft_mini_batch_size / sft_micro_batch_size, not per GPU) and "
            f"FSDP averages {reference_gpus} GPUs: 1/{reference_gpus} of the mean.",
        ]
    else:
        lines.append(f"SFT: agg_mode {sft.agg_mode}, x sft_loss_scale={sft_scale:g}.")
    lines.append(
        f"  sft_grad_clip={algo.sft_grad_clip:g} on the scaled gradient = "
        f"{algo.sft_grad_clip / sft_scale:.4g} on the unscaled one."
    )
    pg = algo.pg_loss
    if pg.entropy_agg_mode == "group_token_mean":
        budget, width = pg.entropy_group_max_tokens, pg.loss_constant
        count = -(-int(per_gpu * (prompt_tokens + response_tokens)) // budget)
        group_tokens = per_gpu * response_tokens / count
        lines += [
            f"RL entropy: a token mean per group of <= {budget} tokens (the reference's "
            f"micro-batches), summed over groups, per rollout; coefficient {pg.entropy_coef:g}.",
            f"  At {prompt_tokens} + {response_tokens} tokens per rollout and {per_gpu:g} rollouts "
            f"per GPU: {count} groups of {group_tokens:.0f} response tokens, so reduced like the pg "
            f"term (sum / {width}) the entropy would weigh {group_tokens / width:.2f}x as much.",
        ]
    return lines


def main(argv: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. experiment=relift_qwen_math_7b")
    parser.add_argument("--reference-gpus", type=int, default=8, help="the reference run's GPUs (8)")
    parser.add_argument("--prompt-tokens", type=int, default=250,
                        help="assumed prompt tokens per rollout (system prompt + problem)")
    parser.add_argument("--response-tokens", type=int, default=3502,
                        help="assumed response tokens (the paper's mean ReLIFT length, 3,502)")
    args = parser.parse_args(argv)
    lines = explain(compose_config(args.overrides), args.reference_gpus, args.prompt_tokens,
                    args.response_tokens)  # fmt: skip
    print("\n".join(lines))
    return lines


if __name__ == "__main__":
    main()
