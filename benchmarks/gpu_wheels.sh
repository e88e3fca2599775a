#!/usr/bin/env bash
# Fetch, on this (networked) machine, the pure-Python/compiled wheels the lent GPU image lacks, for its
# Python 3.12: pydantic (OnlineSettings, Settings) and its needs.  They land in .whl/ (git-ignored via
# .git/info/exclude); name `.whl` in the device run's `carry`.  benchmarks/gpu_session.sh installs them there.
set -eu
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
py=${PYTHON:-.venv/bin/python}
for spec in pydantic==2.14.4 pydantic-core==2.50.5 pydantic-settings==2.16.3 annotated-types==0.8.0 \
            typing-inspection==0.4.5 python-dotenv; do
  "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "$spec"
done
ls -l .whl
