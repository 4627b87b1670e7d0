"""What torch.export needs from a model, and a few lines saying why it failed (issue 19, item 4).

torch.onnx's own message is "Failed to export the model with torch.export. This is step 1/3..." in terminal
colours, after a partial graph dump on stderr; the cause sits at the bottom of the exception chain and the
model's source line in its text or traceback. `explain` names the cause, the line and what to do.
"""

from __future__ import annotations

import re
import traceback
from pathlib import Path

import torch
from torch import nn

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_TORCH_DIR = str(Path(torch.__file__).parent)
_RAISED_AT = re.compile(r'File "([^"]+)", line (\d+), in (\w+)\n\s+(.+)')
_STATIC_DIM = re.compile(r"inferred a static shape of (\d+) for dimension (\S+?)\.?$", re.M)
_UNKNOWN_OUTPUT = re.compile(r"Found <class '([\w.]+)'> in output")


def disable_caches(model: nn.Module) -> bool:
    """use_cache=False on every transformers config and generation config in `model`; True if one was on.

    An encoder-decoder's decoder keeps its own config: changing only the top one leaves a cache object in the
    output, which torch.export cannot flatten.
    """
    changed = False
    for module in model.modules():
        for name in ("config", "generation_config"):
            config = getattr(module, name, None)
            if getattr(config, "use_cache", False) is True:
                config.use_cache = False
                changed = True
    return changed


def _root(exc: BaseException) -> BaseException:
    seen = {id(exc)}
    while (nxt := exc.__cause__ or exc.__context__) is not None and id(nxt) not in seen:
        seen.add(id(nxt))
        exc = nxt
    return exc


def _source_line(root: BaseException, text: str) -> str:
    """`file:line in fn (`code`)` of the model code that raised, from torch's message or the traceback."""
    found = _RAISED_AT.findall(text.split("The following call raised this error:")[-1])
    if found:
        file, line, fn, code = found[-1]
        return f"{file}:{line} in {fn} (`{code.strip()}`)"
    frames = [f for f in traceback.extract_tb(root.__traceback__) if not f.filename.startswith(_TORCH_DIR)]
    if frames:
        f = frames[-1]
        return f"{f.filename}:{f.lineno} in {f.name} (`{(f.line or '').strip()}`)"
    return ""


def explain(exc: BaseException) -> str:
    """A few plain lines: the cause, the model's source line and what to do."""
    root = _root(exc)
    text = _ANSI.sub("", str(root))
    where = _source_line(root, text)
    at = f" at {where}" if where else ""
    if "data-dependent" in text:
        return (f"the model branches on a tensor's value{at}. torch.export records one graph for all inputs, so "
                "a Python `if` on data cannot be exported: rewrite it with torch.cond (or torch.where for an "
                "elementwise choice), or make the condition depend on shapes only.")
    static = _STATIC_DIM.search(text)
    if static:
        size, dim = static.groups()
        return (f"the model's code fixes {dim} at {size} (a Python loop over that axis or a check of its size), "
                "so the exported graph cannot keep it dynamic; export with inputs whose size is the one you will "
                "run (the recorded example's), or make that code size-independent.")
    unknown = _UNKNOWN_OUTPUT.search(text)
    if unknown:
        return (f"the model returns a {unknown.group(1)}, which is not a tensor or a container of tensors{at}; "
                "make forward return tensors only (for transformers, a cache object: set use_cache=False).")
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(root).__name__)
    return f"{type(root).__name__}: {first[:300]}{at}."
