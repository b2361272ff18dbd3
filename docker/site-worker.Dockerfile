# medfed's site worker: the hospital's own installed code (`medfed site serve`), the only
# container that reads the site dataset and holds the privacy ledger, the SecAgg+ state,
# the site policy and the audit log. Built by the hospital from a pinned medfed release;
# nothing in it comes from the coordinator at run time.
FROM python:3.11-slim

WORKDIR /app
ENV PIP_NO_CACHE_DIR=1 \
    FLWR_TELEMETRY_ENABLED=0

# CPU wheels of torch first, so installing medfed does not pull CUDA.
RUN python -m pip install --no-cache-dir "torch==2.13.0" \
        --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md ./
COPY common ./common
COPY client ./client
COPY server ./server
COPY simulation ./simulation
RUN python -m pip install --no-cache-dir ".[fl]" \
    && useradd --uid 49999 --user-group --no-create-home app
USER app

ENTRYPOINT ["medfed"]
