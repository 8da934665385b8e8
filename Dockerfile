# The image both cluster files run (cluster/aws-gpu.yaml through `docker:`, cluster/kuberay-rayjob.yaml's
# pods): Ray 2.60, torch's CUDA build and this project, installed once here rather than by every job on
# every node. Build and push it under the name the cluster files use, a new tag for each new commit:
#   docker build -t YOUR-REGISTRY/olr-ray:0.1.0 . && docker push YOUR-REGISTRY/olr-ray:0.1.0
#
# Base: rayproject/ray:2.60.0-py311-cu128 (Ray 2.60.0, Python 3.11, CUDA 12.8, Ubuntu 22.04, user `ray`,
# HOME /home/ray). Ray's images carry no torch.
FROM rayproject/ray:2.60.0-py311-cu128

# torch and torchvision from PyPI: on Linux x86_64 these are the CUDA builds (2.14.1 is built for CUDA 13.0
# and brings its CUDA libraries as nvidia-* wheels), so the GPU hosts need an NVIDIA driver >= 580.
RUN pip install --no-cache-dir torch==2.14.1 torchvision==0.29.1

# The project and its remaining dependencies (pyproject.toml; Ray and torch are already satisfied).
WORKDIR /home/ray/olr_ray
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users olr_ray/ olr_ray/
RUN pip install --no-cache-dir . && python -c "import olr_ray, ray, torch; assert ray.__version__.startswith('2.60.')"
# Jobs run as `python jobs/full_pipeline.py ...` from this directory (the image's WORKDIR).
COPY --chown=ray:users jobs/ jobs/
