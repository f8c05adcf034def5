# The image every pod of k8s/ runs: Ray head and workers (RayCluster, RayJob, RayService) and the
# MLflow server. Ray's own image (Python 3.11, Ray 2.60.0, the `ray` user) + this project with its
# dependencies at the versions of constraints.txt (torch, torchvision, ray[train,serve,tune], mlflow...).
#
#   CPU:  docker build -t registry.example.com/retrieval-platform:0.1.0 .
#   GPU:  docker build --build-arg BASE_TAG=2.60.0-py311-gpu --build-arg TORCH_INDEX_URL= \
#           -t registry.example.com/retrieval-platform:0.1.0-gpu .
#
# then push it and point the overlay at it (`kustomize edit set image retrieval-platform=...`).
# The -gpu base has CUDA; with TORCH_INDEX_URL empty, pip takes torch's default (CUDA) wheels from
# PyPI. The CPU image takes the smaller CPU-only wheels from PyTorch's index.
# The Ray version of the base must equal the pinned ray (2.60.0) and the RayCluster's rayVersion.
ARG BASE_TAG=2.60.0-py311
FROM rayproject/ray:${BASE_TAG}

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

# Job specs and Serve configs are read relative to this directory (`retrieval train jobs/...`):
# Ray starts in the image's working directory and job drivers inherit it.
WORKDIR /home/ray/app

# Dependencies first, in a layer of their own that only pyproject.toml and constraints.txt reach:
# editing platform/, jobs/ or serve/ does not reinstall torch. The project's dependencies (not the
# project) at the exact versions of constraints.txt; a torch built for the CPU matches its pin too.
COPY --chown=ray:users pyproject.toml constraints.txt ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install --no-cache-dir ${TORCH_INDEX_URL:+--extra-index-url ${TORCH_INDEX_URL}} \
        -c constraints.txt -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# Then the project itself, without touching a dependency.
COPY --chown=ray:users README.md ./
COPY --chown=ray:users platform ./platform
RUN pip install --no-cache-dir --no-deps . \
    && python -c "import ray, torch, mlflow, retrieval; assert ray.__version__ == '2.60.0', ray.__version__"

COPY --chown=ray:users jobs ./jobs
COPY --chown=ray:users serve ./serve
COPY --chown=ray:users tune_spaces ./tune_spaces

# Token authentication is switched on by KubeRay (authOptions) on the cluster; a plain
# `docker run` of this image starts Ray without it.
