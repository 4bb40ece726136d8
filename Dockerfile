# recbalance training image.
#
#   docker build -t recbalance:0.1.0 .                           # GPU (CUDA) image, the default
#   docker build -t recbalance:0.1.0-cpu --build-arg VARIANT=cpu .   # CPU clusters
#
# Versions come from the same pinned files `make install` uses — requirements/base.txt
# (torch, torchx, ...) and requirements/torchrec-$VARIANT.txt (fbgemm-gpu / fbgemm-gpu-cpu
# and torchrec, installed with --no-deps because torchrec's metadata requires the CUDA
# package fbgemm-gpu). No version is repeated here (tests/test_launch_docker.py checks).
#
# GPU: PyPI's torch wheel for Linux x86_64 is the CUDA build and brings the CUDA runtime
# libraries as pip packages; fbgemm-gpu on PyPI is the matching CUDA build. The host's
# driver is injected by the NVIDIA container toolkit, so the base is plain Python.
# CPU: torch comes from PyTorch's CPU index (no CUDA libraries), fbgemm from fbgemm-gpu-cpu.

# Python 3.11: pyproject.toml's requires-python is ">=3.11,<3.12".
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim-bookworm

# gpu | cpu
ARG VARIANT=gpu
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    OMP_NUM_THREADS=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    RECBALANCE_VARIANT=${VARIANT}

WORKDIR /opt/recbalance

# Dependencies first (their layer survives source edits).
COPY requirements/base.txt requirements/torchrec-cpu.txt requirements/torchrec-gpu.txt requirements/
RUN set -eux; \
    case "${VARIANT}" in \
      gpu) index_args="" ;; \
      cpu) index_args="--index-url ${TORCH_CPU_INDEX} --extra-index-url https://pypi.org/simple" ;; \
      *) echo "VARIANT must be gpu or cpu, got '${VARIANT}'" >&2; exit 1 ;; \
    esac; \
    pip install ${index_args} -r requirements/base.txt; \
    pip install --no-deps -r "requirements/torchrec-${VARIANT}.txt"

# The package itself (--no-deps: everything above is already pinned and installed).
COPY pyproject.toml README.md ./
COPY balancing/ balancing/
COPY models/ models/
COPY trainer/ trainer/
COPY launch/ launch/
# Fail the build if what got installed is not what the requirement files pin.
RUN set -eux; \
    pip install --no-deps .; \
    python -m launch.pins requirements/base.txt "requirements/torchrec-${VARIANT}.txt"

# Runs as an unprivileged user; /workspace is its working directory (relative output
# directories such as runs/torchx land there; mount a volume for anything to keep).
RUN set -eux; \
    useradd --create-home --uid 1000 --user-group recbalance; \
    mkdir -p /workspace /data /runs; \
    chown recbalance:recbalance /workspace /data /runs
COPY --chown=recbalance:recbalance configs/ /workspace/configs/
USER recbalance
WORKDIR /workspace

# 9400: Prometheus metrics (metrics.port); 29500: c10d rendezvous on the first node.
EXPOSE 9400 29500
ENTRYPOINT ["recbalance"]
CMD ["--help"]
