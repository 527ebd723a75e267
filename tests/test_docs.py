"""Documentation drift fails CI: the public signatures against the API section of docs/design.md (§2.1),
and the shared docstring fragments composed into the functions.

The document holds a code block with one signature per public function, written as Python
(``name(a, b, *, k=default, ...)``, wrapped over lines as needed); each is parsed with ``ast`` and
compared with ``inspect.signature`` of the function: the positional parameters, the keyword-only
parameters and their defaults, in order.
"""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest
import torch

import varkernels
from varkernels import _docs, reference

ROOT = Path(__file__).resolve().parent.parent
PUBLIC = {
    "fused_var_loss": varkernels.fused_var_loss,
    "fused_linear_var_loss": varkernels.fused_linear_var_loss,
    "weighted_nll": varkernels.weighted_nll,
    "linear_weighted_nll": varkernels.linear_weighted_nll,
    "sequence_logps": varkernels.sequence_logps,
    "linear_sequence_logps": varkernels.linear_sequence_logps,
    "var_loss_reference": varkernels.var_loss_reference,
    "weighted_nll_reference": reference.weighted_nll_reference,
    "var_weights": varkernels.var_weights,
    "patch_causal_lm": varkernels.patch_causal_lm,
    "unpatch_causal_lm": varkernels.unpatch_causal_lm,
}


def _default(value) -> str:
    return str(value) if isinstance(value, torch.dtype) else repr(value)


def render(fn) -> list:
    """[(kind, name, default source or None)] of fn's parameters (kind: positional, keyword, var)."""
    out = []
    for p in inspect.signature(fn).parameters.values():
        kind = {p.KEYWORD_ONLY: "keyword", p.VAR_KEYWORD: "**", p.VAR_POSITIONAL: "*"}.get(p.kind, "positional")
        out.append((kind, p.name, None if p.default is p.empty else _default(p.default)))
    return out


def parse(signature: str) -> list:
    """The same from a documented signature ``name(a, *, k=1)``."""
    args = ast.parse(f"def {signature}: pass").body[0].args
    out = [("positional", a.arg, None) for a in args.posonlyargs + args.args]
    pos_defaults = [None] * (len(out) - len(args.defaults)) + [ast.unparse(d) for d in args.defaults]
    out = [(k, n, d) for (k, n, _), d in zip(out, pos_defaults)]
    if args.vararg:
        out.append(("*", args.vararg.arg, None))
    for a, d in zip(args.kwonlyargs, args.kw_defaults):
        out.append(("keyword", a.arg, None if d is None else ast.unparse(d)))
    if args.kwarg:
        out.append(("**", args.kwarg.arg, None))
    return out


def code_blocks(text: str) -> list:
    """The line lists of the fenced blocks without a language or with ``python``."""
    blocks, current, lang = [], None, None
    for line in text.splitlines():
        if line.startswith("```"):
            if current is None:
                current, lang = [], line[3:].strip()
            else:
                if lang in ("", "python"):
                    blocks.append(current)
                current = None
        elif current is not None:
            current.append(line)
    return blocks


def documented(text: str) -> dict:
    """{name: signature} of the code-block lines that start a public function's signature."""
    found = {}
    for lines in code_blocks(text):
        i = 0
        while i < len(lines):
            m = re.match(r"(\w+)\(", lines[i])
            if m and m.group(1) in PUBLIC:
                sig = lines[i].split("#")[0]
                while sig.count("(") > sig.count(")"):
                    i += 1
                    sig += " " + lines[i].split("#")[0].strip()
                found[m.group(1)] = sig.strip().split(" ->")[0]
            i += 1
    return found


DOCS = {"docs/design.md": ROOT / "docs" / "design.md"}  # the README points there


@pytest.mark.parametrize("doc", list(DOCS))
def test_documented_signatures_match_the_code(doc):
    sigs = documented(DOCS[doc].read_text(encoding="utf-8"))
    missing = sorted(set(PUBLIC) - set(sigs))
    assert not missing, f"{doc} documents no signature of {missing}"
    for name, fn in PUBLIC.items():
        assert parse(sigs[name]) == render(fn), f"{doc}: {sigs[name]}\n  code: {name}{inspect.signature(fn)}"


def test_the_walker_finds_a_wrong_default():
    text = "```\nweighted_nll(logits, labels, weights, *, reduction='sum')\n```\n"
    assert parse(documented(text)["weighted_nll"]) != render(varkernels.weighted_nll)


def test_fragments_are_composed_into_the_public_docstrings():
    for name, fn in PUBLIC.items():
        doc = fn.__doc__ or ""
        assert not re.search(r"^\s*\{\w+\}$", doc, flags=re.M), f"{name}: a fragment placeholder is left"
    shared = _docs.FRAGMENTS["shift_labels"]
    users = [n for n, fn in PUBLIC.items() if shared in (fn.__doc__ or "")]
    assert {"fused_var_loss", "weighted_nll", "sequence_logps"} <= set(users), users
    assert _docs.FRAGMENTS["weights"].split("\n")[0] in reference.weighted_nll_reference.__doc__
    for name in ("fused_linear_var_loss", "linear_weighted_nll", "linear_sequence_logps"):
        assert _docs.FRAGMENTS["chunk_size"].split("\n")[0] in PUBLIC[name].__doc__, name


if __name__ == "__main__":  # print the signatures as the documents write them
    for name, fn in PUBLIC.items():
        print(f"{name}{inspect.signature(fn)}")
