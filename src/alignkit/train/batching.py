"""Batches as pure functions of (seed, epoch) or (seed, step), so that resume and N processes give the same
batches as one uninterrupted run: padding, eval split, length-grouped order, process shares, PPO prompts."""

from __future__ import annotations

import math

import torch


def pad(seqs: list[list[int]], value: int) -> torch.Tensor:
    """Right-pad to the longest sequence. (B, T)"""
    width = max(len(s) for s in seqs)
    return torch.tensor([s + [value] * (width - len(s)) for s in seqs], dtype=torch.long)


def attention_mask(seqs: list[list[int]]) -> torch.Tensor:
    """1 on the tokens of right-padded `seqs`, 0 on padding. (B, T)"""
    return pad([[1] * len(s) for s in seqs], 0)


def split_eval(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic train/eval index split."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    k = int(round(n * fraction)) if n > 1 else 0
    k = min(max(k, 1 if fraction > 0 and n > 1 else 0), n - 1)
    return sorted(perm[k:]), sorted(perm[:k])


def batch_order(lengths: list[int], batch_size: int, seed: int, epoch: int, group_by_length: bool):
    """Global batches (lists of indices) for one epoch, pure in (seed, epoch). group_by_length sorts windows
    of 64 batches of a shuffled stream by length, then shuffles the batches: little padding, still random."""
    g = torch.Generator().manual_seed(seed * 1000003 + epoch)
    perm = torch.randperm(len(lengths), generator=g).tolist()
    if group_by_length:
        win, longest_first = batch_size * 64, lambda j: -lengths[j]
        perm = [i for s in range(0, len(perm), win) for i in sorted(perm[s : s + win], key=longest_first)]
    batches = [perm[s : s + batch_size] for s in range(0, len(perm), batch_size)]
    batches = [b for b in batches if len(b) == batch_size] or batches[:1]
    if group_by_length:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
    return batches


def process_share(batch: list[int], rank: int, world: int, grad_accum: int = 1) -> list[list[int]]:
    """Process `rank`'s share of a global batch (every world-th index), split into micro-batches."""
    mine = batch[rank::world]
    size = math.ceil(len(mine) / grad_accum)
    return [mine[i : i + size] for i in range(0, len(mine), size)]


def token_split(micro: list[list[int]], lengths: list[int], cap: int) -> list[list[int]]:
    """Each micro-batch cut, in order, into runs whose padded size (rows × longest row) is ≤ cap; a row
    longer than cap runs alone. cap 0: as given."""
    out = []
    for idx in micro:
        if cap <= 0:
            out.append(idx)
            continue
        run, longest = [], 0
        for i in idx:
            if run and (len(run) + 1) * max(longest, lengths[i]) > cap:
                out.append(run)
                run, longest = [], 0
            run.append(i)
            longest = max(longest, lengths[i])
        out.append(run)
    return out


def prompt_order(n: int, batch: int, seed: int, step: int) -> list[int]:
    """The prompts of PPO step `step`: a fresh permutation each pass over the data; pure in (seed, step)."""
    per_pass = max(1, n // batch)
    epoch, off = divmod(step, per_pass)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
    return [perm[(off * batch + j) % n] for j in range(batch)]
