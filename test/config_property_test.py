"""
Generated input for the configuration loader (config.load): any bytes in
the conf files load or fail with config.Error, never another exception;
what loads has the type of each default and passes its check; and the
effective configuration written back as a file loads to itself.
Settings: test/properties.py.
"""

import configparser
import os
import tempfile

from hypothesis import given
from hypothesis import strategies as st

import properties  # noqa: F401 (loads the hypothesis profile)
from ovirt_imageio import config

SECTIONS = sorted(config.DEFAULTS)

# Values near the ones each key takes, and junk.
values = st.one_of(
    st.sampled_from([
        "0", "1", "-1", "4096", "8388608", "65535", "65536", "1.5", "nan",
        "inf", "-inf", "1e400", "true", "false", "yes", "Off", "maybe",
        "unix", "tcp", "TCP", "DEBUG", "info", "NOTSET", "root",
        "logfile", "stderr", "logfile,stderr", ",", "long", "", " ",
        "%(asctime)s", "\u0661\u0662", "1_0", "0x10", "12 ",
    ]),
    st.integers(-2**40, 2**40).map(str),
    st.floats().map(str),
    st.text(max_size=20),
)


@st.composite
def conf_texts(draw):
    """Text of a conf file: sections and keys of DEFAULTS, mostly."""
    lines = []
    for _ in range(draw(st.integers(0, 4))):
        section = draw(st.one_of(st.sampled_from(SECTIONS + ["DEFAULT"]),
                                 st.text(max_size=8)))
        lines.append(f"[{section}]")
        keys = list(config.DEFAULTS.get(section, {"x": 0}))
        for _ in range(draw(st.integers(0, 4))):
            key = draw(st.one_of(st.sampled_from(keys),
                                 st.text(max_size=8)))
            sep = draw(st.sampled_from(["=", " = ", ":", " "]))
            lines.append(f"{key}{sep}{draw(values)}")
    return "\n".join(lines) + draw(st.sampled_from(["", "\n", "\n\t x"]))


files = st.one_of(
    conf_texts().map(lambda t: t.encode("utf-8")),
    st.binary(max_size=200),
    st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")),
)


def load(contents):
    """Load a configuration made of these files (bytes) in conf.d."""
    with tempfile.TemporaryDirectory() as tmp:
        conf_d = os.path.join(tmp, "conf.d")
        os.mkdir(conf_d)
        for i, data in enumerate(contents):
            with open(os.path.join(conf_d, f"{50 + i}-x.conf"), "wb") as f:
                f.write(data)
        return config.load(tmp, vendor_dir=os.path.join(tmp, "vendor"))


def check_valid(cfg):
    for section, keys in config.DEFAULTS.items():
        for key, default in keys.items():
            value = getattr(getattr(cfg, section), key)
            assert type(value) is type(default), (section, key, value)
            check = config.CHECKS.get((section, key))
            if check:
                assert check(value) == value, (section, key, value)
    control = cfg.control
    if control.enable and control.transport == "tcp":
        assert control.port != -1


def as_file(cfg):
    """The effective configuration as the text of a conf file."""
    parser = configparser.RawConfigParser()
    for section, keys in config.to_dict(cfg).items():
        parser[section] = {
            key: str(value).lower() if isinstance(value, bool) else
            repr(value) if isinstance(value, float) else str(value)
            for key, value in keys.items()}
    with tempfile.TemporaryFile("w+", encoding="utf-8") as f:
        parser.write(f)
        f.seek(0)
        return f.read()


@given(st.lists(files, min_size=1, max_size=3))
def test_load(contents):
    try:
        cfg = load(contents)
    except config.Error as e:
        # One line naming what is wrong.
        assert "\n" not in str(e)
        return
    check_valid(cfg)
    # Round trip: the effective configuration, written out, loads to
    # itself.
    again = load([as_file(cfg).encode("utf-8")])
    assert config.to_dict(again) == config.to_dict(cfg)
