"""
Our client library as a command, for the side-by-side benchmark's
own-client mode (../shared/bench/README.md, --client-a):

  make bench BENCH_ARGS="--client-a '.venv/bin/python bench/client.py \
      download {url} {file} {ca}' --client-a-upload '.venv/bin/python \
      bench/client.py upload {file} {url} {ca}'"
"""

import argparse
import os
import sys

# An installed client (RPM, pip; upstream's in the anchor venv) runs from
# bytecode compiled at install time. This checkout has none, and with
# PYTHONDONTWRITEBYTECODE set, as on the benchmark machine, every run
# would compile the package again: ~11 ms of a ~90 ms sparse download,
# measuring the compiler rather than the client. So keep the cache
# (__pycache__ next to the sources, ignored by git), as Python does by
# default; a changed source makes Python compile it again.
sys.dont_write_bytecode = False
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ovirt_imageio import client  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("download")
    d.add_argument("url")
    d.add_argument("file")
    d.add_argument("ca")
    d.add_argument("--format", default="raw")
    u = sub.add_parser("upload")
    u.add_argument("file")
    u.add_argument("url")
    u.add_argument("ca")
    args = p.parse_args()
    if args.command == "download":
        client.download(args.url, args.file, args.ca, fmt=args.format)
    else:
        client.upload(args.file, args.url, args.ca)


if __name__ == "__main__":
    main()
