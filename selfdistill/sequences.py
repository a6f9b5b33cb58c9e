"""Token sequences for the student and teacher passes.

Both passes score the same completion token ids after different contexts. A context (the student's prompt, or
the teacher's prompt plus privileged information) is rendered with the tokenizer's chat template and a generation
prompt, tokenised, and the rollout's *exact* completion ids are spliced after it. The completion text is never
re-tokenised: BPE merges at the seam would change the tokens the teacher scores.

Layout of a spliced batch: contexts left-padded to a common width ``W``, completions right-padded to ``T``. The
logits that predict completion token ``t`` sit at position ``W - 1 + t`` in every row, so one
``logits_to_keep=T + 1`` forward serves the whole batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

from selfdistill.sources.base import Prompt, TeacherView


def render_context(tokenizer: Any, context: Prompt) -> list[int]:
    """Token ids of a context: chat messages through the chat template with a generation prompt, or a raw string."""
    if isinstance(context, str):
        return list(tokenizer(context, add_special_tokens=True)["input_ids"])
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            "the prompt is a list of chat messages but the tokenizer has no chat template; set "
            "tokenizer.chat_template or give prompts as plain strings"
        )
    text = tokenizer.apply_chat_template(context, tokenize=False, add_generation_prompt=True)
    # The template already holds any BOS it wants; adding special tokens again would double it.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def continuation_ids(tokenizer: Any, segments: Sequence[Sequence[int] | str]) -> list[int]:
    """Ids of a view's continuation: id lists spliced as they are, strings tokenised without special tokens."""
    out: list[int] = []
    for segment in segments:
        if isinstance(segment, str):
            out.extend(tokenizer(segment, add_special_tokens=False)["input_ids"])
        else:
            out.extend(int(i) for i in segment)
    return out


class TeacherContextTooLong(ValueError):
    """A teacher sequence does not fit the model and its privileged text cannot be shortened enough."""


def fit_view(
    tokenizer: Any, view: TeacherView, completion_length: int, max_length: int, overflow: str = "truncate"
) -> tuple[list[int], bool]:
    """Render a teacher view so that context + completion fits ``max_length``.

    The privileged text (``view.pi``) is shortened from its end when needed; completion tokens never are.
    Returns the context ids (the rendered context followed by the view's continuation segments) and whether the
    privileged text was truncated.
    """
    tail = continuation_ids(tokenizer, view.continuation)
    ids = render_context(tokenizer, view.context) + tail
    excess = len(ids) + completion_length - max_length
    if excess <= 0:
        return ids, False
    fix = (
        f"raise max_teacher_length (now {max_length}), shorten the privileged text, or lower max_completion_length"
    )
    if overflow == "error" or not view.pi:
        raise TeacherContextTooLong(
            f"teacher view {view.name!r} needs {len(ids)} context + {completion_length} completion tokens > "
            f"{max_length}; {fix}" + ("" if view.pi else " (this view marks no privileged text to shorten)")
        )
    pi_ids = tokenizer(view.pi, add_special_tokens=False)["input_ids"]
    marker = " [...]"
    context = view.context
    for _ in range(4):  # a decode/re-encode round trip can shift a few tokens; retry with a larger cut
        keep = len(pi_ids) - excess - len(tokenizer(marker, add_special_tokens=False)["input_ids"]) - 2
        if keep <= 0:
            raise TeacherContextTooLong(
                f"teacher view {view.name!r} does not fit in {max_length} tokens even without its privileged text; "
                f"{fix}"
            )
        short = tokenizer.decode(pi_ids[:keep], skip_special_tokens=True) + marker
        context = _replace_text(view.context, view.pi, short)
        ids = render_context(tokenizer, context) + tail
        new_excess = len(ids) + completion_length - max_length
        if new_excess <= 0:
            return ids, True
        pi_ids = pi_ids[:keep]
        excess = new_excess
    raise TeacherContextTooLong(f"could not shorten teacher view {view.name!r} to fit {max_length} tokens; {fix}")


def _replace_text(context: Prompt, old: str, new: str) -> Prompt:
    if isinstance(context, str):
        if old not in context:
            raise ValueError("the view's pi text does not occur in its context; pi must be a substring of it")
        return context.replace(old, new, 1)
    out, found = [], False
    for message in context:
        message = dict(message)
        content = message.get("content")
        if not found and isinstance(content, str) and old in content:
            message["content"] = content.replace(old, new, 1)
            found = True
        out.append(message)
    if not found:
        raise ValueError("the view's pi text does not occur in its context; pi must be a substring of a message")
    return out


@dataclass
class SplicedBatch:
    """Contexts left-padded to ``context_width``, completions right-padded; all tensors ``[B, W + T]`` or ``[B, T]``."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    completion_ids: torch.Tensor  # [B, T]
    completion_mask: torch.Tensor  # [B, T], 1 on real completion tokens
    context_width: int

    @property
    def completion_width(self) -> int:
        return self.completion_ids.shape[1]

    def to(self, device: torch.device | str) -> SplicedBatch:
        return SplicedBatch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.position_ids.to(device),
            self.completion_ids.to(device),
            self.completion_mask.to(device),
            self.context_width,
        )


def _require_contexts(contexts: Sequence[Sequence[int]]) -> None:
    if any(len(c) == 0 for c in contexts):
        raise ValueError("an empty context: every teacher or student sequence needs at least one context token")


def splice(contexts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_id: int) -> SplicedBatch:
    """Put each completion's exact ids right after its context (see the module docstring for the layout)."""
    if len(contexts) != len(completions):
        raise ValueError(f"{len(contexts)} contexts for {len(completions)} completions")
    _require_contexts(contexts)
    width = max(len(c) for c in contexts)
    t = max([len(c) for c in completions] + [1])
    b = len(contexts)
    input_ids = torch.full((b, width + t), pad_id, dtype=torch.long)
    attention = torch.zeros((b, width + t), dtype=torch.long)
    comp_ids = torch.full((b, t), pad_id, dtype=torch.long)
    comp_mask = torch.zeros((b, t), dtype=torch.long)
    for i, (ctx, comp) in enumerate(zip(contexts, completions)):
        input_ids[i, width - len(ctx) : width] = torch.tensor(list(ctx), dtype=torch.long)
        attention[i, width - len(ctx) : width] = 1
        if comp:
            input_ids[i, width : width + len(comp)] = torch.tensor(list(comp), dtype=torch.long)
            attention[i, width : width + len(comp)] = 1
            comp_ids[i, : len(comp)] = torch.tensor(list(comp), dtype=torch.long)
            comp_mask[i, : len(comp)] = 1
    # Positions count real tokens only, as generate() does with left padding; padding gets position 0.
    position_ids = (attention.cumsum(-1) - 1).clamp_min(0)
    return SplicedBatch(input_ids, attention, position_ids, comp_ids, comp_mask, width)


def completion_logits(model: Any, batch: SplicedBatch) -> torch.Tensor:
    """``[B, T, V]`` logits predicting each completion position (only those positions are computed)."""
    t = batch.completion_width
    out = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        logits_to_keep=t + 1,
        use_cache=False,
    )
    return out.logits[:, :-1, :]


@contextmanager
def head_passthrough(head: torch.nn.Module) -> Iterator[None]:
    """While active, the output head returns its input: the model's "logits" are its final hidden states.

    The model still runs its own forward (so DDP and PEFT wrappers see it, and the head's hooks still run); the
    head's own product is skipped, not computed and thrown away. The fused loss applies the head itself, chunk by
    chunk, and the packed student pass on the predicting positions only.
    """
    previous = head.__dict__.get("forward")
    head.forward = _passthrough
    try:
        yield
    finally:
        if previous is None:
            del head.__dict__["forward"]
        else:
            head.forward = previous


def _passthrough(hidden: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return hidden


def completion_hidden(model: Any, head: torch.nn.Module, batch: SplicedBatch) -> torch.Tensor:
    """``[B, T, H]`` final hidden states at the positions predicting each completion token, without logits."""
    with head_passthrough(head):
        return completion_logits(model, batch)


def score_completions(model: Any, batch: SplicedBatch, contexts: Sequence[Sequence[int]], share_prefix: bool,
                      head: torch.nn.Module | None = None, pack: bool = False, masked: bool = False) -> torch.Tensor:
    """``[B, T, V]`` logits at the completion positions, or ``[B, T, H]`` hidden states when ``head`` is given (the
    fused loss applies it); with ``masked``, ``[N, V]`` (``[N, H]``): the N valid completion positions only, rollout
    by rollout, as ``out[batch.completion_mask.bool()]`` gives them. Shared context prefixes run once: packed into
    one pass when ``pack`` and the model allows it (:func:`packed_completion_logits`; the student's pass, whose
    backward then runs once), else, with ``share_prefix``, as a prefix pass whose KV cache the rows continue from
    (:func:`shared_prefix_logits`)."""
    if pack:
        out = packed_completion_logits(model, batch, contexts, head, masked=masked)
        if out is not None:
            return out
    with nullcontext() if head is None else head_passthrough(head):
        out = shared_prefix_logits(model, batch, contexts) if share_prefix else None
        out = completion_logits(model, batch) if out is None else out
    return out[batch.completion_mask.bool()] if masked else out


#: The keyword (and output field) of the KV cache in the installed transformers: ``cache`` since the rename that
#: deprecates ``past_key_values``, which older 5.x releases still use.
CACHE_KEY = "cache" if "cache" in getattr(CausalLMOutputWithPast, "__dataclass_fields__", {}) else "past_key_values"

#: Shorter common prefixes are not worth a separate forward.
MIN_SHARED_PREFIX = 8


def _prefix_groups(contexts: Sequence[Sequence[int]], min_shared: int) -> tuple[list[int], list[int]]:
    """Group rows whose contexts share a prefix: (group of each row, shared prefix length of each group).

    Contexts are sorted; a context joins its neighbour's group when their common prefix is at least ``min_shared``
    tokens and joining computes fewer tokens than a group of its own: the group's prefix shrinks to the common
    part (every member but one then runs the difference itself; the prefix pass runs that much less), and the
    newcomer runs only what follows it. So the G
    copies of two prompts form two groups sharing their whole prompts rather than one sharing only the chat
    template's header, while G = 1 prompts with a common header share the header.
    """
    order = sorted(range(len(contexts)), key=lambda i: list(contexts[i]))
    group_of = [0] * len(contexts)
    lengths: list[int] = []
    sizes: list[int] = []
    previous = None
    for i in order:
        context = contexts[i]
        if previous is not None:
            common = 0
            limit = min(len(context), len(previous), lengths[-1])
            while common < limit and context[common] == previous[common]:
                common += 1
            # Joining saves the newcomer `common` tokens; the group's own prefix pass shrinks by as much as each of
            # its other members' suffix grows.
            saved = common - (sizes[-1] - 1) * (lengths[-1] - common)
            if common >= min_shared and saved > 0:
                lengths[-1] = common
                sizes[-1] += 1
                group_of[i] = len(lengths) - 1
                previous = context
                continue
        lengths.append(len(context))
        sizes.append(1)
        group_of[i] = len(lengths) - 1
        previous = context
    return group_of, lengths


def left_pad(rows: Sequence[Sequence[int]], width: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, width]`` ids and attention mask of rows left-padded to ``width``."""
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row) :] = torch.tensor(list(row), dtype=torch.long)
            mask[i, width - len(row) :] = 1
    return ids, mask


@dataclass
class PrefixCache:
    """Each group's shared prefix run once, its KV cache rows selected for every member row."""

    first: Any  # the prefix pass's output: logits (or hidden states) of each group's last prefix position
    cache: Any  # the KV cache, one row per member row
    rows: torch.Tensor  # [B] group of each row
    ids: torch.Tensor  # [B, W] each row's prefix ids (left-padded)
    mask: torch.Tensor  # [B, W] each row's prefix attention mask
    suffixes: list[list[int]]  # each row's context after its group's prefix


def run_shared_prefixes(
    model: Any, contexts: Sequence[Sequence[int]], min_shared: int, device: torch.device | str, keep_last: bool = False,
    pad_id: int = 0,
) -> PrefixCache | None:
    """Group rows by common prefix (:func:`_prefix_groups`) and run each group's prefix once with the KV cache on.

    ``keep_last`` leaves every row's last context token out of the shared prefix, so every row has a suffix of at
    least one token (what generation needs: its first new token is predicted from the row's own last position).
    ``None`` when no two rows share ``min_shared`` tokens. The pass runs with gradients when grad mode is on: the
    cache rows are an index of the prefix's keys and values, so the members' gradients flow back into it.
    ``pad_id`` fills the padding (masked out; any id serves).
    """
    _require_contexts(contexts)
    group_of, lengths = _prefix_groups([c[:-1] for c in contexts] if keep_last else contexts, min_shared)
    if len(lengths) == len(contexts):
        return None
    prefixes = [None] * len(lengths)
    for i, g in enumerate(group_of):
        if prefixes[g] is None:
            prefixes[g] = list(contexts[i][: lengths[g]])
    ids, mask = left_pad(prefixes, max(lengths), pad_id)
    ids, mask = ids.to(device), mask.to(device)
    first = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0), use_cache=True,
                  logits_to_keep=1)
    rows = torch.tensor(group_of, device=device)
    cache = first[CACHE_KEY]
    cache.batch_select_indices(rows)
    suffixes = [list(c[lengths[g] :]) for c, g in zip(contexts, group_of)]
    return PrefixCache(first.logits, cache, rows, ids[rows], mask[rows], suffixes)


def shared_prefix_logits(
    model: Any, batch: SplicedBatch, contexts: Sequence[Sequence[int]], min_shared: int = MIN_SHARED_PREFIX
) -> torch.Tensor | None:
    """:func:`completion_logits` for a batch whose contexts share prefixes, computing each shared prefix once.

    The G rollouts of one prompt share their whole context (the student's prompt; the teacher's prompt + privileged
    information); AVSD's views of one rollout share its beginning (the template's header and the problem); every
    row shares the chat template's system prompt. Rows are grouped by common prefix (:func:`run_shared_prefixes`);
    each group's prefix runs once with the KV cache on, its cache rows are selected for every member, and each row's
    own suffix (the rest of its context, left-padded) and completion run on top. The logits predicting the first
    completion token come from the row's last suffix position, or from the prefix pass when the whole context is
    shared. Returns ``[B, T, V]`` like :func:`completion_logits`, or ``None`` when no two rows share a prefix of
    ``min_shared`` tokens. Under grad mode the result is differentiable through both passes (the student's).
    """
    device = batch.input_ids.device
    shared = run_shared_prefixes(model, contexts, min_shared, device)
    if shared is None:
        return None
    first, cache, rows, suffixes = shared.first, shared.cache, shared.rows, shared.suffixes
    s_width = max(len(x) for x in suffixes)
    t = batch.completion_width
    rest_ids, rest_mask = left_pad(suffixes, s_width, 0)  # any pad id: padded positions are masked out
    rest_ids = torch.cat([rest_ids.to(device), batch.completion_ids], dim=1)
    rest_mask = torch.cat([rest_mask.to(device), batch.completion_mask], dim=1)
    full_mask = torch.cat([shared.mask, rest_mask], dim=1)
    # Positions continue from each row's prefix, counting real tokens only (as in splice).
    positions = (full_mask.cumsum(-1) - 1).clamp_min(0)[:, shared.mask.shape[1]:]
    # The head runs only where it predicts a completion token: suffix position s_width - 1 + k for token k (the
    # prefix pass predicts token 0 of a row with no suffix of its own).
    keep = torch.arange(max(s_width - 1, 0), s_width - 1 + t, device=device)
    rest = model(input_ids=rest_ids, attention_mask=full_mask, position_ids=positions, **{CACHE_KEY: cache},
                 use_cache=True, logits_to_keep=keep)
    logits = rest.logits  # [B, len(keep), V]
    if s_width == 0:
        return torch.cat([first[rows, -1:, :], logits], dim=1)
    no_suffix = torch.tensor([not x for x in suffixes], device=device)
    if no_suffix.any():
        first_token = torch.where(no_suffix[:, None], first[rows, -1], logits[:, 0])
        logits = torch.cat([first_token[:, None], logits[:, 1:]], dim=1)
    return logits


#: Attention over a packed row costs about 1 / (this x hidden size) of a token's pass per query-key pair: the linear
#: layers spend ~2 x (params per layer) FLOPs on a token, a pair ~4 x (attention width) FLOPs, and the masked
#: attention kernel runs at ~3/4 of the matmuls' rate (SmolLM2-135M on this project's CPU: ~2,400 = 4.2 x 576).
ATTENTION_PAIR_RATIO = 4.0


def _text_config(model: Any) -> Any:
    """The transformers (text) config behind wrappers (DDP's ``.module``; PEFT forwards ``.config`` itself)."""
    while not hasattr(model, "config") and hasattr(model, "module"):
        model = model.module
    config = getattr(model, "config", None)
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def packs_rows(model: Any) -> bool:
    """Whether :func:`packed_completion_logits` can run on ``model``: its attention takes a custom 4D mask (SDPA or
    eager; flash-attention kernels ignore such a mask) and every layer attends fully (a sliding window would have
    to be folded into the mask)."""
    config = _text_config(model)
    if getattr(config, "_attn_implementation", None) not in ("sdpa", "eager"):
        return False
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return set(layer_types) <= {"full_attention"}
    return not getattr(config, "sliding_window", None)


@dataclass
class PackedRows:
    """Rows that share a context prefix packed into one sequence: ``[prefix | member 1 | member 2 | ...]``.

    Each member's segment (the rest of its context, then its completion without the last token) attends to the
    prefix and causally to itself only, and its positions continue from the prefix, so every hidden state equals
    that of the member's own unpacked sequence (to float rounding).
    """

    input_ids: torch.Tensor  # [R, L]
    position_ids: torch.Tensor  # [R, L]
    segments: torch.Tensor  # [R, L]: 0 the shared prefix, k > 0 the k-th member segment, -1 padding
    rows: torch.Tensor  # [N] packed row of each predicted completion token (rollout-major, then token order)
    columns: torch.Tensor  # [N] its column: the position whose output predicts the token

    def mask(self, boolean: bool, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
        """``[R, 1, L, L]`` attention mask: True (or 0.0) where a query may attend to a key."""
        seg = self.segments.to(device)
        idx = torch.arange(seg.shape[1], device=device)
        causal = idx[:, None] >= idx[None, :]
        q, k = seg[:, :, None], seg[:, None, :]
        allowed = causal & ((q == k) | (k == 0)) & (k >= 0) & (q >= 0)
        allowed |= (q < 0) & (idx[:, None] == idx[None, :])  # padding attends to itself (no empty softmax row)
        allowed = allowed[:, None]
        if boolean:
            return allowed
        return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)


def pack_rows(contexts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
              min_shared: int = MIN_SHARED_PREFIX, tokens_per_pair: float = ATTENTION_PAIR_RATIO * 576,
              pad_id: int = 0) -> PackedRows | None:
    """Pack rows grouped by common context prefix (:func:`_prefix_groups`), each group's prefix once per packed row.

    The attention kernel computes every query-key pair of a packed row, masked or not, so a row grows only while
    that is cheaper than repeating the prefix in a new row: a member of ``b`` tokens joins a row of ``L`` tokens
    with a prefix of ``P`` when the extra pairs, ``(L + b)^2 - L^2``, cost less than ``P`` tokens plus a new row's
    ``(P + b)^2`` pairs, at ``tokens_per_pair`` pairs per token. ``None`` when no two rows share ``min_shared``
    tokens.
    """
    if len(contexts) != len(completions):
        raise ValueError(f"{len(contexts)} contexts for {len(completions)} completions")
    _require_contexts(contexts)
    group_of, lengths = _prefix_groups(contexts, min_shared)
    if len(lengths) == len(contexts):
        return None
    members: list[list[int]] = [[] for _ in lengths]
    for i, g in enumerate(group_of):
        members[g].append(i)
    packed: list[tuple[list[int], list[int], list[int]]] = []  # (ids, positions, segments) per packed row
    where: dict[int, list[tuple[int, int]]] = {}  # rollout -> (packed row, column) of each completion token
    for g, rows in enumerate(members):
        size = lengths[g]
        prefix = list(contexts[rows[0]][:size])
        row: tuple[list[int], list[int], list[int]] | None = None
        segment = 0
        for i in rows:
            rest, completion = list(contexts[i][size:]), list(completions[i])
            body = rest + completion[:-1]
            grown = 2 * len(body) * (len(row[0]) - size) if row is not None else 0
            if row is None or grown >= size * (tokens_per_pair + size):
                row = (list(prefix), list(range(size)), [0] * size)
                packed.append(row)
                segment = 0
            segment += 1
            start = len(row[0])
            row[0].extend(body)
            row[1].extend(range(size, size + len(body)))
            row[2].extend([segment] * len(body))
            r = len(packed) - 1
            first = start + len(rest) - 1 if rest else size - 1  # the context's last token predicts token 0
            where[i] = [(r, first)] + [(r, start + len(rest) + t - 1) for t in range(1, len(completion))]
            if not completion:
                where[i] = []
    width = max(len(ids) for ids, _, _ in packed)
    n = len(packed)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    positions = torch.zeros((n, width), dtype=torch.long)
    segments = torch.full((n, width), -1, dtype=torch.long)
    for r, (ids, pos, seg) in enumerate(packed):
        input_ids[r, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        positions[r, : len(pos)] = torch.tensor(pos, dtype=torch.long)
        segments[r, : len(seg)] = torch.tensor(seg, dtype=torch.long)
    flat = [rc for i in range(len(contexts)) for rc in where[i]]
    rows_t = torch.tensor([r for r, _ in flat], dtype=torch.long)
    cols_t = torch.tensor([c for _, c in flat], dtype=torch.long)
    return PackedRows(input_ids, positions, segments, rows_t, cols_t)


def packed_completion_logits(model: Any, batch: SplicedBatch, contexts: Sequence[Sequence[int]],
                             head: torch.nn.Module | None = None, min_shared: int = MIN_SHARED_PREFIX,
                             masked: bool = False) -> torch.Tensor | None:
    """:func:`completion_logits` computing each shared context prefix once, in one forward (:func:`pack_rows`).

    Unlike :func:`shared_prefix_logits` this is a single pass: its backward computes each weight's gradient once
    (two passes compute two and add them). ``head``:
    the caller's output head (the fused loss): the final hidden states ``[B, T, H]`` come back and the caller applies
    it. Without one the model's own head runs here, on the predicting positions only. Returns ``[B, T, V]`` (zeros
    past each completion's end) like :func:`completion_logits` (``masked``: ``[N, V]`` at the valid positions, as
    :func:`score_completions`), or ``None`` when no two rows share ``min_shared`` tokens, or the model cannot take
    the packed layout (:func:`packs_rows`, a head with a bias or a logit transform).
    """
    own_head = head is None
    if own_head:
        head = _plain_head(model)
        if head is None:
            return None
    if not packs_rows(model):
        return None
    config = _text_config(model)
    completions = [row[mask.bool()].tolist() for row, mask in zip(batch.completion_ids, batch.completion_mask)]
    ratio = ATTENTION_PAIR_RATIO * (getattr(config, "hidden_size", None) or 576)
    packed = pack_rows(contexts, completions, min_shared, ratio)
    if packed is None:
        return None
    device = batch.input_ids.device
    eager = config._attn_implementation == "eager"
    dtype = next(p for p in head.parameters()).dtype
    with head_passthrough(head):
        hidden = model(input_ids=packed.input_ids.to(device), attention_mask=packed.mask(not eager, dtype, device),
                       position_ids=packed.position_ids.to(device), use_cache=False).logits
    picked = hidden[packed.rows.to(device), packed.columns.to(device)]  # [N, H], rollout-major
    if own_head:
        picked = head(picked)
    if masked:  # already the valid positions, in the order the completion mask selects them
        return picked
    out = picked.new_zeros(*batch.completion_ids.shape, picked.shape[-1])
    out[batch.completion_mask.bool()] = picked
    return out


def _plain_head(model: Any) -> torch.nn.Module | None:
    """The model's output head when applying it by hand gives the model's logits: a plain linear layer that
    :func:`selfdistill.fused.output_head` accepts (no bias, no logit transform), not partitioned by ZeRO-3."""
    from selfdistill.fused import output_head

    inner = model
    while not hasattr(inner, "get_output_embeddings") and hasattr(inner, "module"):
        inner = inner.module
    try:
        head = output_head(inner)
    except (AttributeError, ValueError):
        return None
    return head if type(head) is torch.nn.Linear and not hasattr(head.weight, "ds_id") else None


@dataclass
class TeacherContexts:
    """The teacher side of a generation batch, per rollout: one entry per view."""

    ids: list[list[list[int]]]  # context ids (PI shortened to fit when needed)
    scored: list[list[list[int]]]  # the ids each view scores (the rollout's own completion ids, usually)
    names: list[list[str]]
    tags: list[Any]  # the first view's tag, handed back to the source's feedback
    truncated_pi: int  # views whose privileged text was shortened


def teacher_contexts(tokenizer: Any, source: Any, rollouts: Sequence[Any], views: Sequence[Sequence[TeacherView]],
                     max_length: int, overflow: str) -> TeacherContexts:
    """Check a source's views against its combine rule and tokenise them to fit ``max_length``."""
    name = type(source).__name__
    if len(views) != len(rollouts):
        raise ValueError(f"{name}.views returned {len(views)} view lists for {len(rollouts)} rollouts")
    out = TeacherContexts([], [], [], [], 0)
    multi = source.combine != "identity"
    for rollout, rollout_views in zip(rollouts, views):
        if not multi and len(rollout_views) != 1:
            raise ValueError(
                f"{name} returned {len(rollout_views)} views for one rollout but its combine rule is 'identity', "
                "which takes exactly one view; a multi-view source sets combine = 'consensus'"
            )
        names = [view.name for view in rollout_views]
        if not names or (multi and out.names and names != out.names[0]):
            raise ValueError(
                f"{name} returned views {names} for one rollout and {out.names[0] if out.names else []} for "
                "another; every rollout needs the same views in the same order (their targets are combined "
                "position by position)"
            )
        ids_per_view, scored_per_view = [], []
        for view in rollout_views:
            scored = view.completion_ids if view.completion_ids is not None else rollout.completion_ids
            if len(scored) != len(rollout.completion_ids):
                raise ValueError(
                    f"teacher view {view.name!r} scores {len(scored)} tokens for a {len(rollout.completion_ids)}-token "
                    "rollout; a view must score exactly the rollout's completion tokens"
                )
            ids, cut = fit_view(tokenizer, view, len(scored), max_length, overflow)
            out.truncated_pi += int(cut)
            ids_per_view.append(ids)
            scored_per_view.append(list(scored))
        out.ids.append(ids_per_view)
        out.scored.append(scored_per_view)
        out.names.append(names)
        out.tags.append(rollout_views[0].tag)
    return out
