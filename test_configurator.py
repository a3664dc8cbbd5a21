"""configurator.py: config files and --key=value overrides, type-checked against the script's defaults."""
import os
import sys

import pytest

CONFIGURATOR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')
# as a script declares them; None: a key it takes from the config files but ignores (bench.py's training keys)
DEFAULTS = dict(batch_size=16, learning_rate=3e-3, compile=False, out_dir='out/x', grow_from=None)


def configure(monkeypatch, *args):
    """Run configurator.py as train.py does, over globals holding DEFAULTS; return the settings."""
    monkeypatch.setattr(sys, 'argv', ['train.py', *map(str, args)])
    settings = dict(DEFAULTS, os=os)  # and a module the script imports, which is no setting
    exec(open(CONFIGURATOR).read(), settings)
    return {k: settings[k] for k in DEFAULTS}


def config_file(tmp_path, text):
    (tmp_path / 'x.py').write_text(text)
    return tmp_path / 'x.py'


def test_file_then_overrides(tmp_path, monkeypatch):
    path = config_file(tmp_path, 'import math\n_half = 8\nbatch_size = _half\nlearning_rate = 1\n'
                                 'grow_from = "out/a/ckpt.pt"\ndef helper(): pass\n')
    got = configure(monkeypatch, path, '--batch_size=4', '--out_dir=out/y')
    assert got == dict(batch_size=4, learning_rate=1.0, compile=False, out_dir='out/y', grow_from='out/a/ckpt.pt')
    assert type(got['learning_rate']) is float  # an int where a float is expected is taken as a float


@pytest.mark.parametrize('line, message', [
    ('batch_size = "8"', "batch_size='8' is a str, expected int"),
    ('batch_size = 8.0', 'batch_size=8.0 is a float, expected int'),
    ('batch_size = True', 'batch_size=True is a bool, expected int'),
    ('compile = 1', 'compile=1 is a int, expected bool'),
    ('learning_rate = "3e-4"', "learning_rate='3e-4' is a str, expected float"),
])
def test_wrong_type_in_a_config_file(tmp_path, monkeypatch, line, message):
    path = config_file(tmp_path, f'{line}\n')
    with pytest.raises(SystemExit) as e:
        configure(monkeypatch, path)
    assert e.value.code == f'config: {path}: {message}'


@pytest.mark.parametrize('arg, message', [
    ('--batch_size=abc', "--batch_size='abc' is a str, expected int"),
    ('--compile=1', '--compile=1 is a int, expected bool'),
    ('--no_such_key=1', "unknown key 'no_such_key'"),
    ('--os=1', "unknown key 'os'"),
])
def test_bad_override(monkeypatch, arg, message):
    with pytest.raises(SystemExit) as e:
        configure(monkeypatch, arg)
    assert message in e.value.code and '\n' not in e.value.code


def test_unknown_key_in_a_config_file(tmp_path, monkeypatch):
    path = config_file(tmp_path, 'learning_rate = 1e-3\nlerning_rate = 1e-3\n')
    with pytest.raises(SystemExit, match=r"sets unknown keys \['lerning_rate'\]"):
        configure(monkeypatch, path)


@pytest.mark.parametrize('text, message', [
    ('batch_size = (8\n', 'does not run: SyntaxError'),
    ('batch_size = eight\n', "does not run: NameError: name 'eight' is not defined"),
])
def test_a_config_file_that_does_not_run(tmp_path, monkeypatch, text, message):
    path = config_file(tmp_path, text)
    with pytest.raises(SystemExit) as e:
        configure(monkeypatch, path)
    assert message in e.value.code and '\n' not in e.value.code
