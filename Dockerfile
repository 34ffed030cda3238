# Bouquet's two images from one body: `--target server` (the Flower gRPC server, server-side
# evaluation in a worker) and `--target client` (connects to the server and trains every round
# in a fresh worker process, so the GPU memory a round used goes back when the worker exits).
#
# Both are the stage `common` plus their command: the dependency layer - torch and its CUDA
# wheels, gigabytes - and the code are built once and shared by the server and client images.
# Code comes last: a change under services/ rebuilds only the last small layers.
#
# Build args:
#   BASE_IMAGE        any Debian-like image with python3 3.11 (venv module) and util-linux;
#                     the offline build uses one made by debootstrap (scripts/build_images_offline.sh)
#   TORCH_FLAVOUR     gpu (default): PyPI's CUDA torch, runs under the NVIDIA runtime (and on CPU)
#                     cpu: torch/torchvision +cpu from TORCH_CPU_INDEX, no CUDA wheels (much smaller)
#   TORCH_CPU_INDEX   the PyTorch CPU wheel index
#   PIP_INSTALL_OPTS  extra pip options, e.g. "--no-index --find-links http://127.0.0.1:PORT/"
#   VERSION, REVISION the image labels
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE} AS common

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    FL_DATA_DIR=/data \
    FL_RESULTS_DIR=/results

# A non-root user; /data (the data cache volume is initialised from it) is shared through
# group bouquet (setgid, group-writable), /results is where the host folder is mounted.
RUN groupadd --gid 1000 bouquet \
 && useradd --uid 1000 --gid 1000 --create-home --shell /usr/sbin/nologin bouquet \
 && mkdir -p /data /results /slots \
 && chown bouquet:bouquet /data /results /slots \
 && chmod 1777 /slots \
 && chmod 2775 /data \
 && python3 -m venv /opt/venv

ARG TORCH_FLAVOUR=gpu
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
ARG PIP_INSTALL_OPTS=
COPY requirements.lock docker/install-deps.sh /tmp/deps/
RUN sh /tmp/deps/install-deps.sh "$TORCH_FLAVOUR" /tmp/deps/requirements.lock \
 && rm -rf /tmp/deps

COPY docker/entrypoint.sh /usr/local/bin/bouquet-entrypoint

# Your task's extra pip packages (README "Bring your own task"): task/requirements.txt, the one
# file of the task folder that the build context carries (.dockerignore); without it this layer
# installs nothing. pip adds them and their dependencies, held to requirements.lock (a task may
# not change Bouquet's pins: a conflict fails the build). Only the workers import them.
# (The folder is a pattern too, tas[k]: without the file the context has no task/ folder, and
# BuildKit, unlike the classic builder, fails on a pattern below a folder that is not there.)
COPY requirements.lock tas[k]/requirements*.txt /tmp/task/
RUN if [ -f /tmp/task/requirements.txt ]; then \
        pip install ${PIP_INSTALL_OPTS} --constraint /tmp/task/requirements.lock --requirement /tmp/task/requirements.txt; \
    fi \
 && rm -rf /tmp/task

# The project itself, last: `pip install --no-deps .` (its dependencies are all in the layer
# above), then the sources go: the services run from site-packages.
COPY pyproject.toml README.md /tmp/src/
COPY services /tmp/src/services
RUN pip install --no-deps ${PIP_INSTALL_OPTS} /tmp/src \
 && rm -rf /tmp/src
WORKDIR /home/bouquet
USER bouquet
ENTRYPOINT ["bouquet-entrypoint"]
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.vendor="Bouquet" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      io.bouquet.torch-flavour="${TORCH_FLAVOUR}"


FROM common AS server
EXPOSE 8080
CMD ["python", "-m", "services.server"]
LABEL org.opencontainers.image.title="bouquet-server" \
      org.opencontainers.image.description="Bouquet: Flower gRPC federation server (server-side evaluation in a fresh worker process; any of Bouquet's strategies)"


FROM common AS client
CMD ["python", "-m", "services.client"]
LABEL org.opencontainers.image.title="bouquet-client" \
      org.opencontainers.image.description="Bouquet: Flower client that trains every round in a fresh worker process"
