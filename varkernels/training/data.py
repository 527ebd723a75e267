"""Dataset preparation for VAR training: fixed groups, scored once, cached, shuffled as wholes.

docs/design.md §5. The VAR weights of a micro-batch are normalised inside that micro-batch, so the
micro-batch is a unit of the data, not of the loader:

1. ``make_groups``: the N examples are split once into fixed groups of B (seeded permutation).
2. ``VARDataset.build``: per group, R = cross_pair_rewards and Q = cross_pair_logps (B×B each),
   or, with ``cross_pairs=False`` / per-example rewards only, the (B,) shared-context form
   R[j] = r(x_j, y_j), Q[j] = log π_ref(y_j | x_j). Under ``torch.distributed`` with N ranks each
   rank scores every N-th group and the scores are all-gathered, so every rank ends with the
   whole (identical) dataset. The result is cached on disk under a key made of the data,
   reference-model and reward fingerprints and the scoring options (with a checksum of the
   scores: a truncated or corrupted file is scored again), so a second run loads it.
3. One dataset item is one whole group. Any sampler over items (the ``Trainer``'s, or
   ``GroupShuffleSampler`` in a plain loop) shuffles whole groups each epoch; ``VARCollator``
   stacks k groups into one batch without mixing them.

Sequences are x_i ⊕ y_i, right-padded; ``labels`` holds the response tokens and ``ignore_index``
on prompt and padding, in the Hugging Face convention (the loss uses ``shift_labels=True``).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Optional, Union

import torch

from .lm_head import unwrap_model
from .pairs import (
    check_token_lists,
    cross_pair_logps,
    cross_pair_rewards,
    paired_logps,
    paired_rewards,
)

VAR_COLUMNS = ("input_ids", "attention_mask", "labels", "rewards", "ref_logps")
CACHE_FORMAT = 2  # 2: a sha256 of the scores is stored and checked on load


def make_groups(num_examples: int, group_size: int, *, seed: int = 0, drop_last: bool = True) -> list[list[int]]:
    """Split example indices 0..N-1 into fixed groups of ``group_size`` (a seeded permutation).

    The same (N, group_size, seed) always gives the same groups. With ``drop_last=True`` the
    N mod B examples left over are dropped (every micro-batch has the same B, which the
    gradient-accumulation and DDP equivalences need); otherwise the last group is smaller.
    """
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if not isinstance(num_examples, int) or num_examples < group_size:
        raise ValueError(
            f"num_examples must be an int >= group_size = {group_size} (at least one full group), got {num_examples!r}"
        )
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(num_examples, generator=gen).tolist()
    n = (num_examples // group_size) * group_size if drop_last else num_examples
    return [perm[k : k + group_size] for k in range(0, n, group_size)]


# ----------------------------------------------------------------------------- fingerprints


def _hash_tensor(h, t: torch.Tensor) -> None:
    t = t.detach().to("cpu").contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    if t.numel():
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())


def fingerprint_tokens(prompts: Sequence[torch.Tensor], responses: Sequence[torch.Tensor]) -> str:
    """sha256 of the token ids of every prompt and response (order included)."""
    h = hashlib.sha256()
    for name, seqs in (("prompts", prompts), ("responses", responses)):
        h.update(f"{name}:{len(seqs)}".encode())
        for s in seqs:
            _hash_tensor(h, s.long())
    return h.hexdigest()


def fingerprint_model(model: torch.nn.Module) -> str:
    """sha256 of a model's class, config and every parameter and buffer (reads all weights once).

    For very large models pass a cheaper identity (e.g. hub name + revision) as
    ``model_fingerprint=`` to :meth:`VARDataset.build` instead.
    """
    lm = unwrap_model(model)
    h = hashlib.sha256(type(lm).__qualname__.encode())
    config = getattr(lm, "config", None)
    if config is not None and hasattr(config, "to_json_string"):
        h.update(config.to_json_string(use_diff=False).encode())
    for name, t in lm.state_dict().items():
        h.update(name.encode())
        _hash_tensor(h, t)
    return h.hexdigest()


def fingerprint_reward(reward) -> str:
    """Fingerprint of a reward model (its weights) or callable (qualified name and source text).

    A callable's source does not capture state it closes over (a lookup table, a threshold):
    pass ``reward_fingerprint=`` to :meth:`VARDataset.build` when that state can change.
    """
    if reward is None:
        return "none"
    if isinstance(reward, torch.nn.Module):
        return fingerprint_model(reward)
    name = f"{getattr(reward, '__module__', '')}.{getattr(reward, '__qualname__', type(reward).__qualname__)}"
    try:
        src = inspect.getsource(reward)
    except (OSError, TypeError):
        src = repr(reward)
    return hashlib.sha256((name + "\n" + src).encode()).hexdigest()


# ----------------------------------------------------------------------------- dataset


class VARDataset(torch.utils.data.Dataset):
    """Fixed VAR groups with their reward and reference log-prob matrices; one item per group.

    Args:
        prompts, responses: N 1-D integer tensors each (unpadded, non-empty).
        groups: G lists of example indices (usually from :func:`make_groups`).
        rewards: [G, B, B] (R[g, i, j] = r(x_i, y_j) within group g) or [G, B] (shared context).
        ref_logps: same shape as ``rewards``.
        pad_token_id: id used to pad ``input_ids`` (masked out by ``attention_mask``).
        ignore_index: label of prompt and padding positions.
        reduction: how ``ref_logps`` were reduced ("mean" / "sum"), if known; ``VARTrainer``
            checks it against its ``logp_reduction``.

    Item g is a dict of ``input_ids`` / ``attention_mask`` / ``labels`` [B, T_g] and
    ``rewards`` / ``ref_logps`` [B, B] or [B]. Use :meth:`build` to score and cache.
    """

    def __init__(
        self,
        prompts: Sequence[torch.Tensor],
        responses: Sequence[torch.Tensor],
        groups: Sequence[Sequence[int]],
        rewards: torch.Tensor,
        ref_logps: torch.Tensor,
        *,
        pad_token_id: int = 0,
        ignore_index: int = -100,
        reduction: Optional[str] = None,
    ):
        check_token_lists(prompts, responses, same_length=True)
        self.prompts, self.responses = list(prompts), list(responses)
        self.groups = [list(map(int, g)) for g in groups]
        if len(self.groups) == 0:
            raise ValueError("groups must hold at least one group, got none")
        sizes = {len(g) for g in self.groups}
        for g in self.groups:
            bad = [k for k in g if not 0 <= k < len(self.prompts)]
            if bad:
                raise ValueError(f"groups holds example index {bad[0]} outside [0, {len(self.prompts)})")
        for name, t in (("rewards", rewards), ("ref_logps", ref_logps)):
            if not isinstance(t, torch.Tensor) or t.dim() not in (2, 3) or t.shape[0] != len(self.groups):
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{name} must have shape [G, B, B] or [G, B] with G = {len(self.groups)}, got {got}")
        if rewards.shape != ref_logps.shape:
            raise ValueError(
                "rewards and ref_logps must have the same shape, "
                f"got {tuple(rewards.shape)} and {tuple(ref_logps.shape)}"
            )
        if len(sizes) != 1 or rewards.shape[1] != next(iter(sizes)):
            raise ValueError(
                f"every group must have B = rewards.shape[1] = {rewards.shape[1]} examples, "
                f"got group sizes {sorted(sizes)}"
            )
        self.rewards, self.ref_logps = rewards.float(), ref_logps.float()
        self.pad_token_id, self.ignore_index = int(pad_token_id), int(ignore_index)
        self.reduction = reduction

    @property
    def group_size(self) -> int:
        return len(self.groups[0])

    @property
    def cross_pairs(self) -> bool:
        return self.rewards.dim() == 3

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, g: int) -> dict:
        idx = self.groups[g]
        seqs = [torch.cat([self.prompts[k].long(), self.responses[k].long()]) for k in idx]
        T = max(s.numel() for s in seqs)
        B = len(idx)
        input_ids = torch.full((B, T), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((B, T), dtype=torch.long)
        labels = torch.full((B, T), self.ignore_index, dtype=torch.long)
        for r, (k, s) in enumerate(zip(idx, seqs)):
            P = self.prompts[k].numel()
            input_ids[r, : s.numel()] = s
            attention_mask[r, : s.numel()] = 1
            labels[r, P : s.numel()] = s[P:]
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "rewards": self.rewards[g],
            "ref_logps": self.ref_logps[g],
        }

    def to_hf_dataset(self):
        """This dataset as a ``datasets.Dataset`` (one row per group, torch format).

        Columns ``input_ids`` / ``attention_mask`` / ``labels`` ([B, T_g] per row) and
        ``rewards`` / ``ref_logps`` ([B, B] or [B], float32), as :meth:`__getitem__` gives them:
        for trainers that only take a ``datasets.Dataset`` (TRL's ``SFTTrainer``). Keep
        ``remove_unused_columns=False`` and :class:`VARCollator` as the data collator.
        """
        try:
            import datasets
        except ImportError as exc:  # pragma: no cover - the message is the point
            raise ImportError("VARDataset.to_hf_dataset needs the datasets package: pip install datasets") from exc
        rows = [self[g] for g in range(len(self))]
        columns = {name: [row[name].tolist() for row in rows] for name in VAR_COLUMNS}
        return datasets.Dataset.from_dict(columns).with_format("torch")

    @classmethod
    def build(
        cls,
        prompts: Sequence[torch.Tensor],
        responses: Sequence[torch.Tensor],
        *,
        ref_model: torch.nn.Module,
        reward=None,
        example_rewards: Optional[Sequence[float]] = None,
        group_size: int = 8,
        seed: int = 0,
        cross_pairs: Optional[bool] = None,
        reduction: str = "mean",
        share_prefix: bool = True,
        batch_size: Optional[int] = None,
        cache_dir: Optional[Union[str, os.PathLike]] = None,
        model_fingerprint: Optional[str] = None,
        reward_fingerprint: Optional[str] = None,
        pad_token_id: int = 0,
        ignore_index: int = -100,
        progress: Optional[bool] = None,
        distributed: Optional[bool] = None,
    ) -> VARDataset:
        """Group, score and cache a VAR training set.

        Args:
            prompts, responses: N 1-D integer tensors each; example k is (prompts[k], responses[k]).
            ref_model: the frozen reference causal LM (Q comes from it, no gradients).
            reward: a sequence-classification reward model or a callable ``fn(prompts, responses)``
                (see :func:`varkernels.training.pairs.cross_pair_rewards`).
            example_rewards: N precomputed per-example rewards r(x_k, y_k) instead of ``reward``;
                implies the (B,) shared-context form.
            group_size: B, examples per micro-batch. seed: of the grouping (:func:`make_groups`);
                the N mod B examples left over are dropped, so every micro-batch has the same B.
            cross_pairs: True → R and Q are [B, B] per group (B² scorings); False → the (B,)
                shared-context form (B scorings). Default True, False with ``example_rewards``.
            reduction: "mean" or "sum" for Q; must equal the trainer's ``logp_reduction``.
            share_prefix, batch_size: passed to :func:`cross_pair_logps`.
            cache_dir: where the scores are cached (None: no cache). A file that does not load
                or whose checksum does not match is reported (a warning) and scored again.
                Under ``torch.distributed`` the file is written once per node (by local rank 0).
            model_fingerprint, reward_fingerprint: identities to use instead of hashing the
                weights / the callable's source.
            progress: a tqdm bar over groups; None shows it for ≥ 256 scored pairs.
            distributed: split the scoring over the ranks of the default ``torch.distributed``
                process group (rank r scores groups r, r + N, ...; the scores are all-gathered,
                every rank returns the same dataset). ``None`` (default): when a process group
                with more than one rank is initialised. Every rank must call ``build`` at the same
                point with the same arguments (the calls are collective): do not wrap it in
                ``main_process_first()``, which runs it on one rank while the others wait.
        """
        if reward is None and example_rewards is None:
            raise ValueError("pass reward (a model or callable) or example_rewards (one float per example)")
        if reward is not None and example_rewards is not None:
            raise ValueError("pass either reward or example_rewards, not both")
        if cross_pairs is None:
            cross_pairs = example_rewards is None
        if cross_pairs and example_rewards is not None:
            raise ValueError(
                "cross_pairs=True needs r(x_i, y_j) for every pair, but example_rewards gives only r(x_k, y_k); "
                "use cross_pairs=False (the (B,) shared-context form) or pass a reward model/callable"
            )
        check_token_lists(prompts, responses, same_length=True)
        N = len(prompts)
        if example_rewards is not None:
            example_rewards = torch.as_tensor(example_rewards, dtype=torch.float32).reshape(-1)
            if example_rewards.numel() != N:
                raise ValueError(
                    f"example_rewards must have one reward per example (len(prompts) = {N}), "
                    f"got {example_rewards.numel()}"
                )
            if not torch.isfinite(example_rewards).all():
                raise ValueError("example_rewards must be finite; got NaN or ±inf")
        groups = make_groups(N, group_size, seed=seed, drop_last=True)

        rank, world = _rank_world(distributed)
        if world > 1:
            _rendezvous(rank, world)
        key = None
        path = None
        if cache_dir is not None:
            if reward_fingerprint is not None:
                rew_fp = reward_fingerprint
            elif reward is not None:
                rew_fp = fingerprint_reward(reward)
            else:
                h = hashlib.sha256(b"example_rewards")
                _hash_tensor(h, example_rewards)
                rew_fp = h.hexdigest()
            parts = {
                "format": CACHE_FORMAT,
                "data": fingerprint_tokens(prompts, responses),
                "model": model_fingerprint or fingerprint_model(ref_model),
                "reward": rew_fp,
                "group_size": group_size, "seed": seed,
                "cross_pairs": bool(cross_pairs), "reduction": reduction,
            }
            key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
            path = Path(cache_dir) / f"var-scores-{key[:20]}.pt"
            cached = _load_cache(path, key, groups, cross_pairs)
            # Under torch.distributed every rank must take the same branch (the scoring below is
            # collective): use the cache only if every rank could read it.
            if world > 1 and not _all_ranks(cached is not None):
                cached = None
            if cached is not None:
                return cls(prompts, responses, groups, *cached, pad_token_id=pad_token_id,
                           ignore_index=ignore_index, reduction=reduction)

        mine = list(range(rank, len(groups), world))  # round-robin: groups cost about the same
        empty = torch.empty((0, group_size, group_size) if cross_pairs else (0, group_size))
        R_mine, Q_mine = (empty, empty) if not mine else _score_groups(
            [groups[g] for g in mine], prompts, responses, ref_model=ref_model, reward=reward,
            example_rewards=example_rewards, cross_pairs=cross_pairs, reduction=reduction,
            share_prefix=share_prefix, batch_size=batch_size, progress=progress if rank == 0 else False,
        )
        if world > 1:
            import torch.distributed as dist

            shares = [None] * world
            dist.all_gather_object(shares, (mine, R_mine, Q_mine))
            R = torch.empty((len(groups), *R_mine.shape[1:]), dtype=torch.float32)
            Q = torch.empty_like(R)
            for idx, r_part, q_part in shares:
                if idx:
                    R[torch.tensor(idx)] = r_part
                    Q[torch.tensor(idx)] = q_part
        else:
            R, Q = R_mine, Q_mine
        if path is not None and _local_rank(rank) == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            blob = {"key": key, "groups": torch.tensor(groups), "rewards": R, "ref_logps": Q,
                    "sha256": _scores_digest(R, Q)}
            fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
            os.close(fd)
            torch.save(blob, tmp)
            os.replace(tmp, path)  # atomic: a concurrent reader sees the old file or the whole new one
        if world > 1 and path is not None:
            import torch.distributed as dist

            dist.barrier()  # the file exists for every rank once build returns
        return cls(prompts, responses, groups, R, Q, pad_token_id=pad_token_id, ignore_index=ignore_index,
                   reduction=reduction)


def _rank_world(distributed: Optional[bool]) -> tuple[int, int]:
    """(rank, world size) to split the scoring over; (0, 1) when not distributed."""
    if distributed is False:
        return 0, 1
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        if distributed:
            raise ValueError("distributed=True needs an initialised torch.distributed process group, found none")
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


# How long a rank waits in VARDataset.build for the others to reach it before raising (instead of
# hanging in the first collective until the process group's own timeout).
RENDEZVOUS_TIMEOUT_S = 600.0
_BUILD_CALLS = [0]  # distributed builds so far in this process: the same count on every rank


def _rendezvous(rank: int, world: int) -> None:
    """Wait until every rank has entered this build, through the process group's store, or raise.

    ``build`` is collective; the usual mistake is running it inside ``main_process_first()``,
    where the other ranks wait in a barrier until rank 0 is done: a deadlock. This turns it into
    an error that says so.
    """
    import time

    import torch.distributed as dist

    try:
        store = dist.distributed_c10d._get_default_store()
    except Exception:  # no store to meet at (a custom backend): go on without the check
        return
    _BUILD_CALLS[0] += 1
    key = f"varkernels/VARDataset.build/{_BUILD_CALLS[0]}"
    arrived = store.add(key, 1)
    deadline = time.monotonic() + RENDEZVOUS_TIMEOUT_S
    while arrived < world:
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"VARDataset.build on rank {rank}: only {arrived} of {world} ranks entered it within "
                f"{RENDEZVOUS_TIMEOUT_S:.0f} s. Under torch.distributed the scoring is split over the ranks, so "
                "every rank must call build at the same point; do not run it inside main_process_first() (the "
                "other ranks wait in a barrier there), or pass distributed=False to score on each rank alone"
            )
        time.sleep(0.05)
        arrived = store.add(key, 0)


def _local_rank(rank: int) -> int:
    local = os.environ.get("LOCAL_RANK")
    return int(local) if local is not None and local.isdigit() else rank


def _all_ranks(flag: bool) -> bool:
    import torch.distributed as dist

    flags = [None] * dist.get_world_size()
    dist.all_gather_object(flags, bool(flag))
    return all(flags)


def _scores_digest(R: torch.Tensor, Q: torch.Tensor) -> str:
    h = hashlib.sha256()
    _hash_tensor(h, R)
    _hash_tensor(h, Q)
    return h.hexdigest()


def _load_cache(path: Path, key: str, groups, cross_pairs: bool):
    """(R, Q) from a cache file, or None when it is absent, stale, truncated or corrupted (warned)."""
    if not path.exists():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        R, Q = blob["rewards"], blob["ref_logps"]
        B = len(groups[0])
        shape = (len(groups), B, B) if cross_pairs else (len(groups), B)
        problem = None
        if blob.get("key") != key or blob["groups"].tolist() != groups:
            problem = "it was written for other data or options"
        elif tuple(R.shape) != shape or tuple(Q.shape) != shape:
            problem = f"its scores have shape {tuple(R.shape)}, expected {shape}"
        elif blob.get("sha256") != _scores_digest(R, Q):
            problem = "the checksum of its scores does not match"
    except Exception as exc:  # a truncated zip, a bad pickle, missing entries: all mean "score again"
        problem = f"it does not load ({type(exc).__name__}: {exc})"
    if problem is not None:
        warnings.warn(f"VAR score cache {path} is not usable: {problem}; scoring again", stacklevel=3)
        return None
    return R.float(), Q.float()


def _score_groups(
    groups, prompts, responses, *, ref_model, reward, example_rewards, cross_pairs, reduction,
    share_prefix, batch_size, progress,
):
    B = len(groups[0])
    pairs_total = len(groups) * (B * B if cross_pairs else B)
    show = pairs_total >= 256 if progress is None else bool(progress)
    bar = None
    if show:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(groups), desc="scoring VAR groups", unit="group")
        except ImportError:
            bar = None
    R, Q = [], []
    for idx in groups:
        xs = [prompts[k] for k in idx]
        ys = [responses[k] for k in idx]
        if cross_pairs:
            Q.append(cross_pair_logps(ref_model, xs, ys, reduction=reduction, share_prefix=share_prefix,
                                      batch_size=batch_size, progress=False))
            R.append(cross_pair_rewards(reward, xs, ys, batch_size=batch_size, progress=False))
        else:
            Q.append(paired_logps(ref_model, xs, ys, reduction=reduction, batch_size=batch_size, progress=False))
            if example_rewards is not None:
                R.append(example_rewards[torch.tensor(idx)])
            else:
                R.append(paired_rewards(reward, xs, ys, batch_size=batch_size, progress=False))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return torch.stack(R).float(), torch.stack(Q).float()


# ----------------------------------------------------------------------------- batching


class VARCollator:
    """Stacks k whole groups into one batch: [k·B, T] sequences, [k, B, B] or [k, B] scores.

    Groups are padded to a common length T with ``pad_token_id`` / ``ignore_index``; they are
    never mixed: the loss normalises each group separately (see ``varkernels.training.trainer``).
    """

    def __init__(self, pad_token_id: int = 0, ignore_index: int = -100):
        self.pad_token_id, self.ignore_index = pad_token_id, ignore_index

    def __call__(self, features: Sequence[dict]) -> dict:
        if len(features) == 0:
            raise ValueError("VARCollator got an empty list of features (expected k >= 1 groups)")
        missing = [c for c in VAR_COLUMNS if c not in features[0]]
        if missing:
            raise ValueError(
                f"VARCollator: the features have no {missing} column(s) (they have {sorted(features[0])}). "
                "Each feature must be one VARDataset group with the columns "
                f"{list(VAR_COLUMNS)}; a Trainer with remove_unused_columns=True (the default of "
                "TrainingArguments, and of TRL's SFTConfig) drops every column its model's forward (or "
                "its signature columns) does not name: set remove_unused_columns=False"
            )
        features = [
            {c: torch.as_tensor(f[c], dtype=torch.float32 if c in ("rewards", "ref_logps") else torch.long)
             for c in VAR_COLUMNS}
            for f in features
        ]
        T = max(f["input_ids"].shape[1] for f in features)

        def pad(t, value):
            return torch.nn.functional.pad(t, (0, T - t.shape[1]), value=value)

        return {
            "input_ids": torch.cat([pad(f["input_ids"], self.pad_token_id) for f in features]),
            "attention_mask": torch.cat([pad(f["attention_mask"], 0) for f in features]),
            "labels": torch.cat([pad(f["labels"], self.ignore_index) for f in features]),
            "rewards": torch.stack([f["rewards"] for f in features]),
            "ref_logps": torch.stack([f["ref_logps"] for f in features]),
        }


class GroupShuffleSampler(torch.utils.data.Sampler):
    """Group order for a plain PyTorch loop: a fresh seeded permutation of whole groups per epoch.

    Call ``set_epoch(e)`` at the start of each epoch (as with ``DistributedSampler``); the order
    depends only on (seed, epoch). ``transformers.Trainer`` does the same with its own sampler.
    """

    def __init__(self, num_groups: int, seed: int = 0):
        self.num_groups, self.seed, self.epoch = num_groups, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.num_groups, generator=gen).tolist())

    def __len__(self) -> int:
        return self.num_groups
