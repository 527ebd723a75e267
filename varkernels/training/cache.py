"""The score cache: fingerprints of everything the scores depend on, a checksum, atomic saves.

A cache file ``var-scores-<key>.pt`` holds the groups, R and Q of one build and a sha256 of the
scores. The key hashes the token ids, the reference model, the reward and the scoring options,
so any change scores again. Fingerprints:

- a model (reference or reward model): its class, config and every parameter and buffer;
- a function: its qualified name and source (the bytes of its code object when it has no source:
  a lambda typed at a prompt), its defaults, the values its closure holds, and the global names
  it reads (models by their weights, functions of the same module by the same rules, plain values
  by value, other objects by their type only);
- a ``functools.partial``: its function, arguments and keywords; a bound method: its function and
  its instance; a callable instance: its class (name and source) and its attributes;
- values inside closures, partials and instances: numbers, strings, containers of them, tensors,
  models, tokenizers (vocabulary, special tokens, chat template), functions and callables.

A reward whose parts cannot be fingerprinted (an object of an unknown type in a closure, a
partial or an instance) gets ``None``: the build warns once, naming the part, and does not cache
(pass ``reward_fingerprint=`` to cache it anyway).

Writes go to ``var-scores-<key>.<host>.<pid>.tmp`` and are renamed into place (atomic: a reader
sees the old file or the whole new one). A temporary file left by a killed run (its process is
gone, or it is older than a day on another host; ``tmp*.tmp`` of earlier versions after an hour)
is removed by the next build in that folder.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import marshal
import os
import socket
import time
import types
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import torch

from .lm_head import unwrap_model

CACHE_FORMAT = 3  # 2: a sha256 of the scores; 3: rewards fingerprinted from their parts (closures, partials)
_ORPHAN_AGE_OTHER_HOST_S = 24 * 3600.0
_LEGACY_ORPHAN_AGE_S = 3600.0


class Unfingerprintable(Exception):
    """Raised inside the fingerprinting when a part has no stable identity; ``args[0]`` names it."""


# ----------------------------------------------------------------------------- fingerprints


def hash_tensor(h, t: torch.Tensor) -> None:
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
            hash_tensor(h, s.long())
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
        hash_tensor(h, t)
    return h.hexdigest()


def _is_tokenizer(v) -> bool:
    return hasattr(v, "get_vocab") and hasattr(v, "convert_tokens_to_ids") and hasattr(v, "special_tokens_map")


def _fp_tokenizer(v) -> str:
    h = hashlib.sha256(type(v).__qualname__.encode())
    backend = getattr(v, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(v.get_vocab().items())).encode())
    h.update(json.dumps(v.special_tokens_map, sort_keys=True, default=str).encode())
    h.update(str(getattr(v, "chat_template", None)).encode())
    return h.hexdigest()


def _source_or_code(fn) -> str:
    try:
        return inspect.getsource(fn)
    except (OSError, TypeError):
        code = getattr(fn, "__code__", None)
        if code is None:
            raise Unfingerprintable(f"{fn!r} has neither source nor a code object") from None
        return marshal.dumps(code).hex()


def _global_names(code) -> set:
    names = set(code.co_names)
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            names |= _global_names(c)
    return names


def _fp_function(fn, seen: set) -> str:
    name = f"{fn.__module__}.{fn.__qualname__}"
    if id(fn) in seen:
        return name
    seen.add(id(fn))
    parts = [name, _source_or_code(fn), _fp_value(fn.__defaults__, seen, f"{name}.__defaults__"),
             _fp_value(fn.__kwdefaults__, seen, f"{name}.__kwdefaults__")]
    for var, cell in zip(fn.__code__.co_freevars, fn.__closure__ or ()):
        try:
            contents = cell.cell_contents
        except ValueError:  # an empty cell (a name assigned after the function was made)
            contents = None
        parts.append(f"{var}=" + _fp_value(contents, seen, f"the variable {var!r} its closure holds"))
    glb = fn.__globals__
    for var in sorted(_global_names(fn.__code__)):
        if var not in glb:
            continue
        v = glb[var]
        if isinstance(v, (types.FunctionType, type)) and v.__module__.split(".")[0] != fn.__module__.split(".")[0]:
            parts.append(f"{var}:{v.__module__}.{v.__qualname__}")  # another package's function: its name
            continue
        try:
            parts.append(f"{var}=" + _fp_value(v, seen, var))
        except Unfingerprintable:
            # Another object of the module: only its type is seen (its state is not; see the module docstring).
            parts.append(f"{var}:{type(v).__module__}.{type(v).__qualname__}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _fp_value(v, seen: set, where: str) -> str:
    """A stable fingerprint of ``v`` or ``Unfingerprintable(where)``."""
    if v is None or isinstance(v, (bool, int, float, str, bytes, complex)):
        return f"{type(v).__name__}:{v!r}"
    if isinstance(v, (list, tuple, set, frozenset)):
        items = sorted(_fp_value(x, seen, where) for x in v) if isinstance(v, (set, frozenset)) else [
            _fp_value(x, seen, where) for x in v
        ]
        return f"{type(v).__name__}[" + ",".join(items) + "]"
    if isinstance(v, dict):
        return "dict{" + ",".join(
            f"{_fp_value(k, seen, where)}:{_fp_value(x, seen, where)}" for k, x in v.items()
        ) + "}"
    if isinstance(v, types.ModuleType):
        return f"module:{v.__name__}"
    if isinstance(v, torch.nn.Module):
        return "model:" + fingerprint_model(v)
    if isinstance(v, torch.Tensor):
        h = hashlib.sha256()
        hash_tensor(h, v)
        return "tensor:" + h.hexdigest()
    if isinstance(v, torch.dtype):
        return str(v)
    if _is_tokenizer(v):
        return "tokenizer:" + _fp_tokenizer(v)
    if hasattr(v, "pattern") and hasattr(v, "flags") and type(v).__name__ == "Pattern":
        return f"re:{v.pattern!r}:{v.flags}"
    if isinstance(v, type):
        try:
            return f"class:{v.__module__}.{v.__qualname__}:" + inspect.getsource(v)
        except (OSError, TypeError):
            return f"class:{v.__module__}.{v.__qualname__}"
    if callable(v):
        return _fp_callable(v, seen, where)
    if hasattr(v, "dtype") and hasattr(v, "tobytes") and hasattr(v, "shape"):  # numpy arrays
        return f"array:{v.dtype}{tuple(v.shape)}:" + hashlib.sha256(v.tobytes()).hexdigest()
    raise Unfingerprintable(f"{where} (a {type(v).__module__}.{type(v).__qualname__})")


def _fp_callable(fn, seen: set, where: str) -> str:
    if isinstance(fn, torch.nn.Module):
        return "model:" + fingerprint_model(fn)
    fp = getattr(fn, "fingerprint", None)
    if callable(fp) and not isinstance(fn, type) and getattr(fp, "__self__", None) is fn:
        value = fp()
        if value is None:
            raise Unfingerprintable(f"{where} (its fingerprint() returned None)")
        return "own:" + str(value)
    if isinstance(fn, functools.partial):
        return "partial:" + "|".join([
            _fp_callable(fn.func, seen, f"the function of {where}"),
            _fp_value(fn.args, seen, f"the arguments of {where}"),
            _fp_value(fn.keywords, seen, f"the keywords of {where}"),
        ])
    if isinstance(fn, types.MethodType):
        if isinstance(fn.__self__, type):
            return "classmethod:" + _fp_callable(fn.__func__, seen, where)
        return "method:" + _fp_callable(fn.__func__, seen, where) + "|" + _fp_value(
            fn.__self__, seen, f"the instance of {where}")
    if isinstance(fn, types.FunctionType):
        return "fn:" + _fp_function(fn, seen)
    if isinstance(fn, (types.BuiltinFunctionType, types.BuiltinMethodType)):
        return f"builtin:{getattr(fn, '__module__', '')}.{fn.__qualname__}"
    cls = type(fn)
    if id(fn) in seen:
        return f"instance:{cls.__qualname__}"
    seen.add(id(fn))
    attrs = getattr(fn, "__dict__", None)
    if attrs is None:
        raise Unfingerprintable(f"{where} (a {cls.__module__}.{cls.__qualname__} without attributes to read)")
    return f"instance:{_fp_value(cls, seen, where)}:" + _fp_value(
        dict(sorted(attrs.items())), seen, f"an attribute of {where} (a {cls.__qualname__})"
    )


def fingerprint_reward(reward) -> Optional[str]:
    """Fingerprint of a reward: a model by its weights, a callable from its parts (module docstring).

    Returns None when a part has no stable identity (see :func:`explain_unfingerprintable`).
    """
    if reward is None:
        return "none"
    try:
        return hashlib.sha256(_fp_callable(reward, set(), "the reward").encode()).hexdigest()
    except Unfingerprintable:
        return None


def fingerprint_value(value) -> Optional[str]:
    """Fingerprint of a plain value, tensor, model or tokenizer (the rules of the module docstring), or None."""
    try:
        return hashlib.sha256(_fp_value(value, set(), "the value").encode()).hexdigest()
    except Unfingerprintable:
        return None


def explain_unfingerprintable(reward) -> str:
    """Which part of ``reward`` has no stable identity ('' when it has one)."""
    try:
        _fp_callable(reward, set(), "the reward")
        return ""
    except Unfingerprintable as exc:
        return str(exc.args[0])


def scores_digest(R: torch.Tensor, Q: torch.Tensor) -> str:
    h = hashlib.sha256()
    hash_tensor(h, R)
    hash_tensor(h, Q)
    return h.hexdigest()


def cache_key(parts: dict) -> str:
    return hashlib.sha256(json.dumps({"format": CACHE_FORMAT, **parts}, sort_keys=True).encode()).hexdigest()


def cache_path(cache_dir, key: str) -> Path:
    return Path(cache_dir) / f"var-scores-{key[:20]}.pt"


# ----------------------------------------------------------------------------- files


def load_scores(path: Path, key: str, groups, cross_pairs: bool):
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
        elif blob.get("sha256") != scores_digest(R, Q):
            problem = "the checksum of its scores does not match"
    except Exception as exc:  # a truncated zip, a bad pickle, missing entries: all mean "score again"
        problem = f"it does not load ({type(exc).__name__}: {exc})"
    if problem is not None:
        warnings.warn(f"VAR score cache {path} is not usable: {problem}; scoring again", stacklevel=3)
        return None
    return R.float(), Q.float()


def save_scores(path: Path, key: str, groups, R: torch.Tensor, Q: torch.Tensor) -> None:
    """Write the scores atomically: a temporary file in the same folder, then a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = {"key": key, "groups": torch.tensor(groups), "rewards": R, "ref_logps": Q, "sha256": scores_digest(R, Q)}
    tmp = path.with_name(f"{path.stem}.{socket.gethostname()}.{os.getpid()}.tmp")
    try:
        torch.save(blob, tmp)
        os.replace(tmp, path)  # atomic: a concurrent reader sees the old file or the whole new one
    finally:
        if tmp.exists():
            tmp.unlink()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_orphans(cache_dir) -> list[Path]:
    """Remove the temporary files of killed writers from ``cache_dir``; returns the removed paths.

    ``var-scores-<key>.<host>.<pid>.tmp`` is an orphan when <host> is this machine and <pid> is not a
    running process, or when it is older than a day (another host: its process cannot be checked).
    ``tmp*.tmp`` files (the names of earlier versions, without a pid) are orphans after an hour.
    """
    folder = Path(cache_dir)
    if not folder.is_dir():
        return []
    host, removed = socket.gethostname(), []
    for tmp in folder.glob("var-scores-*.tmp"):
        parts = tmp.name[: -len(".tmp")].split(".")
        orphan = False
        if len(parts) >= 3 and parts[-1].isdigit():
            tmp_host, pid = ".".join(parts[1:-1]), int(parts[-1])
            if tmp_host == host:
                orphan = pid != os.getpid() and not _pid_alive(pid)
        if not orphan:
            try:
                orphan = time.time() - tmp.stat().st_mtime > _ORPHAN_AGE_OTHER_HOST_S
            except FileNotFoundError:
                continue
        if orphan:
            try:
                tmp.unlink()
                removed.append(tmp)
            except FileNotFoundError:
                pass
    # earlier versions wrote tempfile.mkstemp names (tmpXXXXXXXX.tmp) without a pid: an hour old is an orphan
    for tmp in folder.glob("tmp*.tmp"):
        try:
            if time.time() - tmp.stat().st_mtime > _LEGACY_ORPHAN_AGE_S:
                tmp.unlink()
                removed.append(tmp)
        except FileNotFoundError:
            pass
    return removed
