"""End-to-end VAR alignment of a tiny Llama on a synthetic language, on CPU in under a minute.

1. A synthetic language: a prompt is ``BOS <color> a b c SEP`` (one of 4 color markers and three
   random content tokens); a response is 3-10 content tokens then EOS, each from a Markov chain
   over the 24 content tokens or, with probability 1/4, a token of the marker's color (each
   content token has one of the 4 colors).
2. A tiny Llama (random init from a config) is pre-trained on that language: the reference π_ref.
3. The reference samples responses for training prompts; a programmatic reward scores them:
   r(x, y) = fraction of the content tokens of y that have the color of x's marker (≈ 0.45 for the
   reference).
4. ``VARDataset.build`` forms fixed groups of B = 8, scores R[i, j] = r(x_i, y_j) and
   Q[i, j] = log π_ref(y_j | x_i) (prefix-shared KV cache), and caches them.
5. ``VARTrainer`` trains the policy (initialised from the reference) with the fused-linear VAR loss.
6. Both models sample fresh responses for held-out prompts; the last line prints their mean reward.

The language, reward, model and sampler live in ``examples/_toy.py`` (shared with
``compare_methods.py``).

Run: ``python examples/toy_alignment.py`` (docs/trainer.md gives its run time on this project's machine).
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import tempfile
import time

import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import transformers  # noqa: E402
from _toy import PAD, Language, mean_reward, pretrain, reward, sample, tiny_llama  # noqa: E402

from varkernels.training.data import VARDataset  # noqa: E402
from varkernels.training.trainer import VARConfig, VARTrainer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pretrain-steps", type=int, default=300)
    ap.add_argument("--train-prompts", type=int, default=1024)
    ap.add_argument("--eval-prompts", type=int, default=512)
    ap.add_argument("--epochs", type=float, default=3.0)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads; 1 by default: the models are tiny, and spinning OpenMP threads on a "
                         "busy 2-core machine made each step >10x slower")
    ap.add_argument("--cache-dir", default=None, help="where R/Q are cached (default: a temporary directory)")
    args = ap.parse_args()
    transformers.logging.set_verbosity_error()
    logging.getLogger("varkernels").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    torch.manual_seed(args.seed)
    lang = Language(args.seed)

    reference = tiny_llama()
    loss = pretrain(reference, lang, args.pretrain_steps)
    print(f"[{time.time() - t0:5.1f}s] reference pre-trained: final loss {loss:.3f}")

    train_prompts = lang.prompts(args.train_prompts)
    eval_prompts = lang.prompts(args.eval_prompts)  # held out: never seen in training
    responses = sample(reference, train_prompts, seed=args.seed + 1)
    print(f"[{time.time() - t0:5.1f}s] sampled {len(responses)} training responses; "
          f"mean reward {sum(reward(train_prompts, responses)) / len(responses):.3f}")

    with tempfile.TemporaryDirectory() as tmp:
        cache_dir = args.cache_dir or os.path.join(tmp, "scores")
        dataset = VARDataset.build(
            train_prompts, responses, ref_model=reference, reward=reward, group_size=8, seed=args.seed,
            cache_dir=cache_dir, pad_token_id=PAD, batch_size=64, progress=False,
        )
        print(f"[{time.time() - t0:5.1f}s] scored {len(dataset)} groups of 8 (R and Q are 8x8 per group)")

        policy = copy.deepcopy(reference)
        config = VARConfig(
            output_dir=os.path.join(tmp, "out"), beta=args.beta, per_device_train_batch_size=2,
            num_train_epochs=args.epochs, learning_rate=3e-3, lr_scheduler_type="cosine", warmup_steps=10,
            weight_decay=0.0, logging_steps=20, save_strategy="no", report_to=[], use_cpu=True, seed=args.seed,
            disable_tqdm=True,
        )
        trainer = VARTrainer(model=policy, args=config, train_dataset=dataset)
        trainer.train()
        last = [h for h in trainer.state.log_history if "var/ess" in h][-1]
        print(f"[{time.time() - t0:5.1f}s] VAR training done: loss {last['loss']:.3f}, "
              f"ESS {last['var/ess']:.2f}/8, weights in [{last['var/weights_min']:.3f}, {last['var/weights_max']:.3f}]")

    ref_r = mean_reward(reference, eval_prompts, seed=args.seed + 2)
    pol_r = mean_reward(policy, eval_prompts, seed=args.seed + 2)
    print(f"[{time.time() - t0:5.1f}s] evaluated on {len(eval_prompts)} held-out prompts")
    print(f"mean reward: reference {ref_r:.3f} -> policy {pol_r:.3f}")


if __name__ == "__main__":
    main()
