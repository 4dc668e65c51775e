# egress-router image: two stages on one Debian 12 (bookworm) base.
#
#   builder   builds our wheel and installs it with its dependencies into a venv (/opt/egress-router)
#   (final)   the base + that venv: python3, iptables (nft default, legacy too), no pip, no compilers
#
# Online, the usual way: `docker build -t egress-router .` (podman build too). The base is pulled,
# apt installs what it lacks (python3, iptables), pip installs the Python packages from the index.
# Offline: scripts/build-image downloads the wheels on the host into build/wheelhouse in the context
# and builds on the local base (scripts/container-base) with --network none: nothing is fetched.
# The builder takes the wheelhouse whenever the context has one, and the package index otherwise.
#
# Build arguments; with plain internet access none is needed:
#   BASE             a Debian 12 image (default: the public debian:bookworm-slim)
#   PIP_INDEX_URL    a mirror of the package index, for the online builder
#   HTTP_PROXY, HTTPS_PROXY, NO_PROXY (and lower case)   Docker's predefined proxy arguments: apt and pip use them
#   VERSION, SOURCE  the version and source labels (scripts/build-image sets both)
# Behind a TLS-inspecting proxy, put its CA certificates (PEM) at build/index-ca.crt in the context:
# the online builder's pip trusts them (PIP_CERT); the final image never contains them.
ARG BASE=debian:bookworm-slim

FROM ${BASE} AS runtime-base
# The runtime packages: from the base image when it has them (the local one), else from apt.
RUN set -eu; \
    if command -v python3 && command -v iptables-nft-restore && command -v iptables-legacy-restore; then :; \
    else \
      apt-get update; \
      DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 iptables; \
      rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/cache/apt/archives/*.deb /var/log/apt /var/log/dpkg.log; \
    fi >/dev/null; \
    update-alternatives --quiet --set iptables /usr/sbin/iptables-nft

FROM runtime-base AS builder
# build* copies what the context has of build/ (.dockerignore lets in build/wheelhouse and
# build/index-ca.crt only) and nothing when it has neither: a pattern may match nothing beside files that exist.
COPY setup.cfg pyproject.toml README.md entrypoint.py build* /src/
COPY egress_router /src/egress_router
# Packages the image carries beyond our declared dependencies (PyYAML: the manifest tooling's).
ARG EXTRA_PACKAGES=PyYAML
ARG PIP_INDEX_URL
# pip runs straight from its wheel: it is never installed, neither here nor in the final image. Online,
# that wheel is Debian's python3-pip-whl (the builder only; apt's lists were removed with the runtime stage).
RUN set -eu; \
    if [ -d /src/wheelhouse ]; then \
      echo "builder: offline, from the wheelhouse in the build context"; \
      mv /src/wheelhouse /wheelhouse; \
      pip_whl=$(ls /wheelhouse/pip-*.whl); index="--no-index --find-links /wheelhouse"; \
    else \
      echo "builder: online, from the package index ${PIP_INDEX_URL:-(pip's default)}"; \
      apt-get update >/dev/null; \
      DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3-pip-whl >/dev/null; \
      pip_whl=$(ls /usr/share/python-wheels/pip-*.whl); index=; \
      if [ -f /src/index-ca.crt ]; then export PIP_CERT=/src/index-ca.crt; fi; \
    fi; \
    pip() { py=$1; shift; "$py" "$pip_whl/pip" "$@" $index --no-cache-dir --disable-pip-version-check; }; \
    pip python3 wheel --quiet --no-deps --wheel-dir /dist /src; \
    python3 -m venv --without-pip /opt/egress-router; \
    pip /opt/egress-router/bin/python install --quiet --only-binary=:all: /dist/egress_router-*.whl $EXTRA_PACKAGES; \
    rm -f /opt/egress-router/bin/activate* /opt/egress-router/bin/Activate.ps1

FROM runtime-base
ARG VERSION=unknown
ARG SOURCE=unknown
LABEL org.opencontainers.image.title="egress-router" \
      org.opencontainers.image.description="Relays pod traffic to outside servers from one reserved source IP (OpenShift egress router, reimplemented): redirect (iptables NAT), HTTP proxy and DNS proxy modes" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=builder /opt/egress-router /opt/egress-router
ENV PATH=/opt/egress-router/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
# Root by default: the redirect modes change the pod's network namespace (NET_ADMIN, NET_RAW).
# The proxy modes run as any user with every capability dropped (e.g. runAsUser: 65534).
ENTRYPOINT ["egress-router"]
