"""
nanoGPT's poor man's configurator. Run from a script that defines its config as globals:

    exec(open('configurator.py').read())

then `python train.py config/stage1.py --batch_size=32 --compile=False` first executes the
config file, then applies each --key=value override. Both are type-checked against the
default (an int may stand for a float; a default of None takes any value), and unknown keys
are an error (a typo must not silently train the wrong thing).
"""

import sys
from ast import literal_eval


def _fail(msg):
    raise SystemExit(f"config: {msg}")


def _checked(key, value, where):
    """value, if it has the type of key's default; an int where a float is expected becomes a float."""
    default = _defaults[key]
    if isinstance(default, float) and type(value) is int:
        return float(value)
    if default is not None and type(value) is not type(default):
        _fail(f"{where}{key}={value!r} is a {type(value).__name__}, expected {type(default).__name__}")
    return value


# the settings: the script's plain values (None: a key it declares but ignores, as bench.py does the training keys)
_defaults = {k: v for k, v in globals().items()
             if not k.startswith("_") and (v is None or isinstance(v, (bool, int, float, str)))}

for _arg in sys.argv[1:]:
    if not _arg.startswith("--"):
        if not _arg.endswith(".py"):
            _fail(f"{_arg!r} is neither a config file (.py) nor a --key=value override")
        try:
            _src = open(_arg).read()
        except OSError:
            _fail(f"no config file {_arg}; the ladders are in config/")
        _before = dict(globals())
        try:
            exec(_src)
        except Exception as _e:  # a typo in a config file: say where, not a traceback through this file
            _fail(f"{_arg} does not run: {type(_e).__name__}: {_e}")
        _unknown = []
        for _key, _val in list(globals().items()):
            # helpers a config imports or defines (modules, functions) are not settings
            if _key.startswith("_") or callable(_val) or type(_val).__name__ == "module":
                continue
            if _key in _defaults:
                globals()[_key] = _checked(_key, _val, f"{_arg}: ")
            elif _key not in _before or _val is not _before[_key]:
                _unknown.append(_key)
        if _unknown:
            _fail(f"{_arg} sets unknown keys {sorted(_unknown)}; check the spelling against train.py")
    else:
        if "=" not in _arg:
            _fail(f"{_arg!r} needs a value: --key=value")
        _key, _val = _arg[2:].split("=", 1)
        if _key not in _defaults:
            _fail(f"unknown key {_key!r}; check the spelling against train.py")
        try:
            _val = literal_eval(_val)
        except (SyntaxError, ValueError):
            pass  # a bare string such as --out_dir=out/x
        globals()[_key] = _checked(_key, _val, "--")
