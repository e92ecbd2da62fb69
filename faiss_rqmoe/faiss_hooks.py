"""faiss's module functions extended to IndexRQMoE, the way ``faiss.contrib.torch_utils`` extends faiss.

Importing faiss_rqmoe installs these hooks (docs/clients.md): ``faiss.write_index``,
``faiss.read_index``, ``faiss.serialize_index``, ``faiss.deserialize_index``,
``faiss.clone_index`` and ``faiss.ParameterSpace().set_index_parameter(s)`` then
accept an IndexRQMoE and the package's files and bytes, so programs that
persist and tune through faiss (LangChain's and LlamaIndex's faiss stores,
benchmark harnesses) hold one unchanged. Everything else goes to faiss's own
function, with faiss's results and exceptions: a hook only diverts an
IndexRQMoE object, or a file or byte string of the package's format (a zip
archive holding the package's header; no faiss index file is a zip archive).

Turn them off with the environment variable ``FAISS_RQMOE_FAISS_HOOKS=0``
(read at import) or ``faiss_rqmoe.faiss_hooks.uninstall()``; ``install()``
puts them back. Installing twice is harmless: each hook keeps faiss's own
function and is recognised as a hook.

The CPU scan keeps ``faiss.cvar.indexIVF_stats`` (``scan.count_ivf_search``):
harnesses read distance computations from it.
"""
from __future__ import annotations

import functools
import os

import faiss

from .storage import is_package_file, sniff

ENV_VAR = "FAISS_RQMOE_FAISS_HOOKS"
# the modules whose functions are hooked: faiss, and the SWIG module that LangChain imports as faiss
# when FAISS_NO_AVX2 is set
_MODULES = tuple(m for m in (faiss, getattr(faiss, "swigfaiss", None)) if m is not None)
_FUNCTIONS = ("write_index", "read_index", "serialize_index", "deserialize_index", "clone_index")
_METHODS = ("set_index_parameter", "set_index_parameters")
_ORIGINAL = "_faiss_rqmoe_original"
# IndexRQMoE's search parameters; faiss's "quantizer_" prefix goes to the coarse quantizer, as for faiss's IVF
SEARCH_PARAMETERS = ("nprobe", "nshort")


def _is_rqmoe(obj) -> bool:
    from .index import IndexRQMoE

    return isinstance(obj, IndexRQMoE)


def _is_path(obj) -> bool:
    return isinstance(obj, (str, os.PathLike))


def _reader_buffer_if_ours(reader):
    """A binary file object over the unread bytes of a faiss.VectorIOReader that holds a file of the
    package's format (which it then counts as read), else None."""
    from .io import package_buffer

    if not isinstance(reader, faiss.VectorIOReader):
        return None
    size, start = reader.data.size(), int(reader.rp)
    if size - start < 8 or sniff(bytes(reader.data.at(start + i) for i in range(8)))[0] != "npz":
        return None
    buffer = package_buffer(faiss.vector_to_array(reader.data)[start:])
    if buffer is not None:
        reader.rp = size
    return buffer


# ------------------------------------------------------------------- hooks
# Each hook takes faiss's function and the call's arguments exactly as given, and hands the call to
# faiss's function unless the arguments are the package's: faiss keeps its own results and errors,
# argument-count and keyword errors included.
def _write_index(original, args, kwargs):
    if not (len(args) >= 2 and _is_rqmoe(args[0])):
        return original(*args, **kwargs)
    from .io import serialize_index, write_index

    index, target = args[:2]
    if isinstance(target, faiss.IOWriter):
        target.write_bytes(serialize_index(index).tobytes())
        return None
    return write_index(index, target)


def _read_index(original, args, kwargs):
    if args:
        from .devices import resolve_device
        from .io import index_from_buffer, read_index

        if _is_path(args[0]) and is_package_file(args[0]):
            return read_index(args[0])
        buffer = _reader_buffer_if_ours(args[0])
        if buffer is not None:
            return index_from_buffer(buffer, resolve_device(None))
    return original(*args, **kwargs)


def _serialize_index(original, args, kwargs):
    if not (args and _is_rqmoe(args[0])):
        return original(*args, **kwargs)
    from .io import serialize_index

    return serialize_index(args[0])


def _deserialize_index(original, args, kwargs):
    from .devices import resolve_device
    from .io import package_buffer, index_from_buffer

    buffer = package_buffer(args[0]) if args else None
    if buffer is None:
        return original(*args, **kwargs)
    return index_from_buffer(buffer, resolve_device(None))


def _clone_index(original, args, kwargs):
    if not (len(args) == 1 and _is_rqmoe(args[0])):
        return original(*args, **kwargs)
    from .io import clone_index

    return clone_index(args[0])


def _set_index_parameter(original, args, kwargs):
    if not (len(args) == 4 and _is_rqmoe(args[1])):
        return original(*args, **kwargs)
    space, index, name, value = args
    if isinstance(name, str) and name.startswith("quantizer_") and index.is_trained:
        return original(space, index.quantizer, name[len("quantizer_"):], value)
    if name not in SEARCH_PARAMETERS:
        # the exception faiss raises for a name the index does not have
        raise RuntimeError(f"ParameterSpace::set_index_parameter: could not set parameter {name} "
                           f"(IndexRQMoE takes {', '.join(SEARCH_PARAMETERS)} and quantizer_*)")
    setattr(index, name, value)
    return None


def _set_index_parameters(original, args, kwargs):
    if not (len(args) == 3 and _is_rqmoe(args[1])):
        return original(*args, **kwargs)
    space, index, description = args
    if not isinstance(description, str):
        raise TypeError("set_index_parameters for an IndexRQMoE takes a string such as 'nprobe=16,nshort=50', "
                        f"got {type(description).__name__}")
    for item in filter(None, description.split(",")):
        name, sep, value = item.partition("=")
        if not sep:
            raise RuntimeError(f"ParameterSpace::set_index_parameters: could not parse {item!r} "
                               "(expected name=value)")
        try:
            number = float(value)
        except ValueError:
            raise RuntimeError(f"ParameterSpace::set_index_parameters: {name}={value!r} is not a number") from None
        space.set_index_parameter(index, name, number)
    return None


_HOOKS = {"write_index": _write_index, "read_index": _read_index, "serialize_index": _serialize_index,
          "deserialize_index": _deserialize_index, "clone_index": _clone_index,
          "set_index_parameter": _set_index_parameter, "set_index_parameters": _set_index_parameters}


def _hooked(name: str, original):
    hook = _HOOKS[name]

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        return hook(original, args, kwargs)

    setattr(wrapper, _ORIGINAL, original)
    return wrapper


def _targets():
    """(owner, name) of every attribute hooked: module functions and ParameterSpace's methods."""
    for module in _MODULES:
        for name in _FUNCTIONS:
            if hasattr(module, name):
                yield module, name
    for name in _METHODS:
        yield faiss.ParameterSpace, name


# ------------------------------------------------------------------ switch
def faiss_function(name: str):
    """faiss's own module function ``name``, hooked or not."""
    function = getattr(faiss, name)
    return getattr(function, _ORIGINAL, function)


def install() -> None:
    """Hook faiss's functions (idempotent: hooks already in place are kept, never wrapped twice)."""
    for owner, name in _targets():
        current = getattr(owner, name)
        if not hasattr(current, _ORIGINAL):
            setattr(owner, name, _hooked(name, current))


def uninstall() -> None:
    """Give faiss its own functions back; IndexRQMoE objects then go to faiss's functions and fail there."""
    for owner, name in _targets():
        current = getattr(owner, name)
        if hasattr(current, _ORIGINAL):
            setattr(owner, name, getattr(current, _ORIGINAL))


def installed() -> bool:
    """Whether faiss's functions are hooked."""
    return all(hasattr(getattr(owner, name), _ORIGINAL) for owner, name in _targets())


def install_unless_disabled() -> None:
    """``install()`` unless ``FAISS_RQMOE_FAISS_HOOKS`` is 0, false, no or off."""
    if os.environ.get(ENV_VAR, "1").strip().lower() not in ("0", "false", "no", "off"):
        install()


# ------------------------------------------------------------------- stats