# syntax=docker/dockerfile:1
# Helix images. One build stage makes the project's wheel; each target installs it on its own base:
#
#   operator    slim Python, CPU only, non-root. `helix operator` (the default command), the routers the
#               operator creates (`helix router`: tokenizers only, no torch), and the planner CLI.
#   worker      vLLM's CUDA image plus this project: `helix worker --engine vllm|torch --device cuda`.
#               torch, CUDA, vLLM and transformers come from the base image and are kept exactly.
#   worker-cpu  slim Python with CPU torch and a tiny random-weight model at /models/tiny-llama:
#               the torch engine on CPU nodes, for trying the operator on kind (docs/deploy.md).
#
#   docker build --target operator   -t ghcr.io/helix-operator/helix-operator:0.1.0 .
#   docker build --target worker     -t ghcr.io/helix-operator/helix-worker:0.1.0 .
#   docker build --target worker-cpu -t helix-worker-cpu:0.1.0 .
#
# Build args: PYTHON_VERSION (slim images and the build stage), VLLM_IMAGE and VLLM_VERSION (the
# worker's base image, VLLM_IMAGE:VLLM_VERSION; the vllm engine supports the vLLM series in
# worker/engines/vllm_compat.py), TORCH_INDEX_URL (where worker-cpu gets torch: the CPU
# wheel index; the version is the worker extra's exact pin, never a range that would pull CUDA wheels).
ARG PYTHON_VERSION=3.11
ARG VLLM_IMAGE=vllm/vllm-openai
ARG VLLM_VERSION=v0.32.0

FROM python:${PYTHON_VERSION}-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY helix ./helix
COPY planner ./planner
COPY simulator ./simulator
COPY experiments ./experiments
COPY worker ./worker
COPY operator ./operator
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:${PYTHON_VERSION}-slim AS operator
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN useradd --uid 10001 --user-group --create-home --home-dir /home/helix helix
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir "$(ls /wheels/helix_operator-*.whl)[router]" && rm -rf /wheels
USER 10001:10001
WORKDIR /home/helix
# 8000 router API, 8080 operator metrics, 8081 operator health
EXPOSE 8000 8080 8081
ENTRYPOINT ["helix"]
CMD ["operator", "--all-namespaces"]

FROM ${VLLM_IMAGE}:${VLLM_VERSION} AS worker
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY --from=build /wheels /wheels
# The base image's GPU stack is pinned as a constraint: if the project ever needed other versions of
# these, the build fails here instead of pip quietly swapping in a CUDA wheel of another torch.
RUN python3 -m pip list --format=freeze \
        | grep -iE '^(torch|torchvision|torchaudio|triton|vllm|xformers|flashinfer-python|transformers|tokenizers|numpy)==' \
        > /tmp/base-gpu-stack.txt \
    && python3 -m pip install --no-cache-dir --constraint /tmp/base-gpu-stack.txt /wheels/helix_operator-*.whl \
    && rm -rf /wheels /tmp/base-gpu-stack.txt \
    && useradd --uid 10001 --user-group --create-home --home-dir /home/helix helix
USER 10001:10001
WORKDIR /home/helix
EXPOSE 5555
ENTRYPOINT ["helix"]
CMD ["worker", "--help"]

FROM python:${PYTHON_VERSION}-slim AS worker-cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN useradd --uid 10001 --user-group --create-home --home-dir /home/helix helix
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==2.13.0" \
    && pip install --no-cache-dir "$(ls /wheels/helix_operator-*.whl)[worker]" \
    && rm -rf /wheels \
    && python -c "from helix.worker.tiny_model import create_tiny_model; create_tiny_model('/models/tiny-llama')"
USER 10001:10001
WORKDIR /home/helix
EXPOSE 5555
ENTRYPOINT ["helix"]
CMD ["worker", "--help"]
