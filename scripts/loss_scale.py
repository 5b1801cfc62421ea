"""Where the grad clips bind: the loss scales a config uses, and the clips they amount to.

    python scripts/loss_scale.py experiment=relift_qwen_math_7b trainer=fsdp_8gpu

The losses here are normalised by global counts (means over the whole mini-batch; the RL entropy's
groups are formed over all of it), so they do not depend on the world size or the micro-batching
(with several RL mini-batches, which rollouts share one does: see relift_pl/update/rl.py); the
ReLIFT reference's per-GPU losses are sums over that GPU's sequences (RL) or a fraction of a mean
(SFT), so its gradients are a constant multiple of these and its clips bind elsewhere. ``algorithm.rl_loss_scale`` / ``sft_loss_scale``
multiply the loss before backward to put the clips where the reference's bind; with AdamW nothing
else sees the scale but Adam's eps, which stays as negligible as in the reference.
"""

from __future__ import annotations

import argparse

from plan_memory import compose_config


def explain(cfg, reference_gpus: int, prompt_tokens: int, response_tokens: int) -> list[str]:
    """Lines that derive each scale from the config and the reference's layout."""
    algo, pg = cfg.algorithm, cfg.algorithm.pg_loss
    rollouts = cfg.data.batch_size * algo.group_size // algo.num_mini_batches
    per_gpu = rollouts / reference_gpus
    rl_scale, sft_scale = algo.rl_loss_scale, algo.sft_loss_scale
    # The reference's per-GPU loss is a sum over its rollouts / the response width: a constant
    # multiple of this loss only when it too divides by sequences x a constant width.
    constant = pg.agg_mode == "constant"
    width = pg.loss_constant
    if width is None:  # the loss divides by the batch's widest response, at most this
        width = cfg.rollout.sampling.max_new_tokens
    lines = [
        f"RL: a mini-batch of {rollouts} rollouts ({cfg.data.batch_size} prompts x G="
        f"{algo.group_size} / {algo.num_mini_batches} mini-batches); the loss is normalised by "
        f"the whole mini-batch's counts (agg_mode {pg.agg_mode}), x rl_loss_scale={rl_scale:g} "
        "before backward.",
    ]
    if constant:
        lines += [
            f"  Its mean over rollouts of sum / {width:g}"
            + (" (loss_constant null: the widest response, at most max_new_tokens)"
               if pg.loss_constant is None else "")
            + f"; the reference's GPUs each sum their {per_gpu:g} rollouts' losses (gradient "
            f"accumulation 1) and FSDP averages its {reference_gpus} GPUs: {per_gpu:g} x the mean.",
            f"  rl_grad_clip={algo.rl_grad_clip:g} on the scaled gradient = "
            f"{algo.rl_grad_clip / rl_scale:.4g} on the mean's (the reference's scale needs "
            f"rl_loss_scale={per_gpu:g}).",
        ]  # fmt: skip
    else:
        lines += [
            "  No reference scale: the scale derivation assumes the constant normaliser "
            "(agg_mode constant, the reference's sum over tokens / the response width).",
            f"  rl_grad_clip={algo.rl_grad_clip:g} on the scaled gradient = "
            f"{algo.rl_grad_clip / rl_scale:.4g} on the unscaled one.",
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
    if pg.entropy_agg_mode == "group_token_mean":
        budget, shards = pg.entropy_group_max_tokens, pg.entropy_group_shards
        tokens = rollouts * (prompt_tokens + response_tokens)
        count = shards * -(-tokens // (shards * budget))
        reference = -(-int(per_gpu * (prompt_tokens + response_tokens)) // budget)
        group_tokens = rollouts * response_tokens / count
        lines += [
            f"RL entropy: a token mean per group of <= {budget} tokens (the reference's "
            f"micro-batches), summed over groups, per rollout; coefficient {pg.entropy_coef:g}.",
            f"  At {prompt_tokens} + {response_tokens} tokens per rollout: {shards} x "
            f"ceil(tokens / {shards} / {budget}) = {count} groups of {group_tokens:.0f} response "
            f"tokens per mini-batch, formed over all of it (any world size); the reference's "
            f"{reference_gpus} GPUs each form {reference} ({reference * reference_gpus} in all) "
            "when its re-deal shares the tokens evenly.",
        ]
        if constant:
            lines.append(
                f"  So reduced like the pg term (sum / {width:g}) the entropy would weigh "
                f"{group_tokens / width:.2f}x as much."
            )
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
