# medfed's SuperExec: Flower's official SuperExec image plus medfed and its dependencies,
# so the ServerApp (coordinator) and the ClientApp (hospitals) run without installing
# anything at run time (FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1: sites are offline).
# Keep the tag equal to the flwr version pinned in pyproject.toml (tests check it).
FROM flwr/superexec:1.42.0

WORKDIR /app
ENV FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \
    PIP_NO_CACHE_DIR=1

# CPU wheels of torch first, so installing medfed does not pull CUDA.
RUN python -m pip install --no-cache-dir "torch==2.13.0" \
        --index-url https://download.pytorch.org/whl/cpu
COPY --chown=app:app pyproject.toml README.md ./
COPY --chown=app:app common ./common
COPY --chown=app:app client ./client
COPY --chown=app:app server ./server
COPY --chown=app:app simulation ./simulation
RUN python -m pip install --no-cache-dir ".[fl]"

ENTRYPOINT ["flower-superexec"]
