"""
nanoGPT's poor man's configurator. Run from a script that defines its config as globals:

    exec(open('configurator.py').read())

then `python train.py config/stage1.py --batch_size=32 --compile=False` first executes the
config file, then applies each --key=value override. Overrides are type-checked against the
default, and unknown keys are an error (a typo must not silently train the wrong thing).
"""

import sys
from ast import literal_eval


def _fail(msg):
    raise SystemExit(f"config: {msg}")


for _arg in sys.argv[1:]:
    if not _arg.startswith("--"):
        if not _arg.endswith(".py"):
            _fail(f"{_arg!r} is neither a config file (.py) nor a --key=value override")
        try:
            _src = open(_arg).read()
        except OSError:
            _fail(f"no config file {_arg}; the ladders are in config/")
        _before = set(globals())
        exec(_src)
        _unknown = set(globals()) - _before - {"_before", "_src"}
        # helpers a config imports or defines (modules, functions) are not settings
        _unknown = {k for k in _unknown if not k.startswith("_") and not callable(globals()[k])
                    and type(globals()[k]).__name__ != "module"}
        if _unknown:
            _fail(f"{_arg} sets unknown keys {sorted(_unknown)}; check the spelling against train.py")
    else:
        if "=" not in _arg:
            _fail(f"{_arg!r} needs a value: --key=value")
        _key, _val = _arg[2:].split("=", 1)
        if _key not in globals() or _key.startswith("_"):
            _fail(f"unknown key {_key!r}; check the spelling against train.py")
        try:
            _val = literal_eval(_val)
        except (SyntaxError, ValueError):
            pass  # a bare string such as --out_dir=out/x
        _default = globals()[_key]
        if _default is not None and not isinstance(_val, type(_default)) \
                and not (isinstance(_default, float) and isinstance(_val, int)):
            _fail(f"--{_key}={_val!r} is a {type(_val).__name__}, expected {type(_default).__name__}")
        if isinstance(_default, float):
            _val = float(_val)
        globals()[_key] = _val
