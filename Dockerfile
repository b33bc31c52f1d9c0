# The musiclora image: Ray's own base image (the pinned Ray, Python 3.11) + the package with its
# pinned dependencies + the Ray entry points (ray_jobs/) and the Serve app (serve/).
#   docker build -t musiclora:0.1.0 .                                    CPU: k8s/base, k8s/overlays/cpu-dev
#   docker build --build-arg RAY_VARIANT=gpu -t musiclora:0.1.0-gpu .    CUDA: k8s/overlays/gpu, cluster/gpu-aws.yaml
# RAY_VERSION is the ray== pin of constraints/cpu.txt and WORKDIR is musiclora.k8s.APP_DIR, where the
# RayJob entrypoints point (tests/unit/test_k8s.py checks both).
ARG RAY_VERSION=2.60.0
ARG RAY_VARIANT=cpu
FROM rayproject/ray:${RAY_VERSION}-py311-${RAY_VARIANT}

ARG RAY_VERSION
ARG RAY_VARIANT
# The CPU variant installs the +cpu torch wheel pinned in constraints/cpu.txt from this index;
# the GPU variant installs the same torch version's CUDA build from the default index.
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu

# libsndfile: soundfile decodes audio; dpkg-dev: `musiclora corpus build` (apt-get download + dpkg -x)
USER root
RUN apt-get update -qq \
 && apt-get install -y -qq --no-install-recommends libsndfile1 dpkg-dev \
 && rm -rf /var/lib/apt/lists/*
USER ray

WORKDIR /home/ray/musiclora
# DS_ACCELERATOR is not baked in: each training worker sets it from its run's run.use_gpu (cuda for
# GPU runs, cpu otherwise; musiclora.train.device) before DeepSpeed starts, in both variants.
# cluster/gpu-aws.yaml and the k8s gpu overlay set cuda on GPU nodes for everything else.
ENV PYTHONPATH=/home/ray/musiclora \
    TOKENIZERS_PARALLELISM=false \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Dependencies first (a layer that survives code edits), every install under the same constraints.
COPY --chown=ray:users constraints/ constraints/
RUN if [ "$RAY_VARIANT" = cpu ]; then \
      cp constraints/cpu.txt /tmp/constraints.txt \
      && pip install --extra-index-url "$TORCH_CPU_INDEX" -c /tmp/constraints.txt torch; \
    else \
      sed 's/^\(torch==[^+]*\)+cpu$/\1/' constraints/cpu.txt > /tmp/constraints.txt \
      && pip install -c /tmp/constraints.txt torch; \
    fi
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users src/ src/
RUN pip install -c /tmp/constraints.txt ".[train,serve]" \
 && python -c "import ray, torch, musiclora; assert ray.__version__ == '${RAY_VERSION}', ray.__version__"

# Entry points and the Serve app (imported as `serve.app` from PYTHONPATH), last: they change most.
COPY --chown=ray:users ray_jobs/ ray_jobs/
COPY --chown=ray:users serve/ serve/
