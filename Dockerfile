# dist-prune cluster node: CUDA + PyTorch + DeepSpeed + Ray + MLflow, `dist-prune` as entrypoint.
# Build:  docker build -t dist-prune .
# Use as the image of every Ray node (head and workers), or run a job directly:
#   docker run --gpus all -v $PWD:/work dist-prune run configs/quickstart.yaml cluster.use_gpu=true
FROM nvidia/cuda:12.8.1-cudnn-devel-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 \
    TORCH_EXTENSIONS_DIR=/opt/torch_extensions VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
RUN apt-get update && apt-get install -y --no-install-recommends \
        python3 python3-venv python3-dev g++ ninja-build git && \
    rm -rf /var/lib/apt/lists/* && python3 -m venv $VIRTUAL_ENV

WORKDIR /opt/dist-prune
COPY pyproject.toml README.md requirements.lock ./
COPY dist_prune ./dist_prune
COPY launch ./launch
COPY configs ./configs
# The tested versions of requirements.lock, with one exception: torch comes as the CUDA build of
# the same version (with the CUDA libraries and triton it needs) instead of the lock's CPU build.
RUN pip install "torch==2.13.0" --index-url https://download.pytorch.org/whl/cu128 && \
    grep -v '^torch==' requirements.lock > /tmp/requirements.gpu.lock && \
    pip install --no-deps -r /tmp/requirements.gpu.lock && \
    pip install --no-deps --no-build-isolation .

ENTRYPOINT ["dist-prune"]
CMD ["--help"]
