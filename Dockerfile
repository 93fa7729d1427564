# Image for the planner CLI (`helix plan`, `helix simulate`): slim, CPU only, non-root.
# The operator/router and GPU worker stages are added with the data plane and operator.
#   docker build -t helix:dev .
#   docker run --rm -v $PWD/examples:/examples helix:dev plan --cluster /examples/clusters/single-24.yaml
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY helix ./helix
COPY simulator ./simulator
COPY worker ./worker
COPY operator ./operator
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:${PYTHON_VERSION}-slim AS planner
RUN useradd --uid 10001 --create-home helix
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER 10001
ENTRYPOINT ["helix"]
CMD ["--help"]
