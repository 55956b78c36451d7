# fibquant-server container image.
#
#   docker build -t fibquant-server .
#   docker run --rm -p 50051:50051 -p 9464:9464 fibquant-server
#
# Two stages: the build stage installs the toolchain with the project's own scripts/install-deps
# (the same package list developers and CI use, so the image cannot drift from a working build);
# the runtime stage installs only scripts/runtime-packages, which scripts/lint-deploy checks against
# `ldd` of the built binaries.

FROM debian:12 AS build
# install-deps is copied alone first so the slow package layer is cached across source changes.
COPY scripts/install-deps /src/scripts/install-deps
RUN /src/scripts/install-deps && rm -rf /var/lib/apt/lists/*
COPY . /src
# Release, no benchmarks; only the shipped programs are built (the test targets are configured
# but not compiled). The CLI target is built when the tree has one.
RUN cmake -S /src -B /build -G Ninja -DCMAKE_BUILD_TYPE=Release -DFQ_BUILD_BENCH=OFF \
 && cmake --build /build --target fibquant-server \
 && mkdir -p /out \
 && install -m 0755 /build/server/fibquant-server /out/ \
 && if ninja -C /build -t targets all | grep -q '^fibquant:'; then \
      cmake --build /build --target fibquant \
      && install -m 0755 "$(find /build -type f -name fibquant -perm -u+x | head -n 1)" /out/; \
    fi

FROM debian:12-slim
COPY scripts/runtime-packages /tmp/runtime-packages
# The unquoted substitution is meant to split into one argument per package.
RUN apt-get update \
 && apt-get install -y --no-install-recommends $(grep -v -e '^#' -e '^[[:space:]]*$' /tmp/runtime-packages) \
 && rm -rf /var/lib/apt/lists/* /tmp/runtime-packages
# A fixed numeric uid/gid so Kubernetes' runAsNonRoot can verify the user without /etc/passwd.
RUN groupadd --system --gid 10001 fibquant \
 && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
      --shell /usr/sbin/nologin fibquant \
 && mkdir -p /var/lib/fibquant /etc/fibquant/profiles \
 && chown 10001:10001 /var/lib/fibquant
COPY --from=build /out/ /usr/local/bin/
# The project's default profiles (the same as `make run` preloads), so a plain `docker run` has
# profiles to serve; Kubernetes mounts the fibquant-profiles ConfigMap over this directory.
COPY server/default-profiles/ /etc/fibquant/profiles/
USER 10001:10001
# Registered profiles and trained codebooks persist here (a volume, so the root fs can stay
# read-only); profile specs in the preload dir are registered at start-up (a ConfigMap in k8s).
VOLUME /var/lib/fibquant
# 50051: gRPC (KvCompressionService, grpc.health.v1, reflection); 9464: Prometheus /metrics.
EXPOSE 50051 9464
# Plaintext by default so the image runs anywhere for a first try; the TLS overlay
# (deploy/overlays/tls) appends --tls-cert/--tls-key/--tls-client-ca, which take precedence.
# SIGTERM starts the server's graceful drain (--drain-seconds).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/fibquant-server", "--listen=0.0.0.0:50051", "--allow-insecure", "--metrics-listen=0.0.0.0:9464", "--data-dir=/var/lib/fibquant", "--preload-dir=/etc/fibquant/profiles"]
