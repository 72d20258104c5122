# meshnode's image: one image for every role, as Istio's charts run it.
#   meshnode proxy ztunnel   the node proxy (ztunnel chart: `args: [proxy, ztunnel]`)
#   install-cni              the CNI node agent (istio-cni chart: `command: [install-cni]`; a link to
#                            meshnode, which runs `meshnode cni-agent` under that name); it copies
#                            /usr/local/bin/meshnode-cni, the CNI plugin, onto the node
#   meshnode waypoint        a namespace's waypoint (daemonset/waypoint)
# Build: docker build -t ghcr.io/meshnode/meshnode:dev .   (the build stage runs CI's release build command
# with the `dist` profile: release plus whole-program LTO, as ztunnel's release builds; no Docker engine runs
# where this was written, so the image itself is untested there.)

# The toolchain CI uses (the crates need 1.85 or later).
FROM docker.io/library/rust:1.95-bookworm AS build
WORKDIR /src
# The whole context (.dockerignore keeps target/ and git objects out; .git's HEAD and refs stay so
# `meshnode version` names the revision).
COPY . .
RUN cargo build --profile dist --locked --workspace \
 && mkdir -p /out/usr/local/bin \
 && cp target/dist/meshnode target/dist/meshnode-cni /out/usr/local/bin/ \
 && ln -s meshnode /out/usr/local/bin/install-cni

# glibc and libgcc only (what the binaries link), no shell, no package manager.
FROM gcr.io/distroless/cc-debian12
# Copied as a directory so the install-cni link stays a link.
COPY --from=build /out/ /
# ztunnel's relative default paths (./var/run/secrets/istio/root-cert.pem, ./var/run/secrets/tokens/istio-token)
# resolve from /.
WORKDIR /
# Istio's proxy user by default (the waypoint runs as it); the node proxy and the CNI agent run as root with
# the capabilities their DaemonSets add (runAsUser: 0), as ztunnel and istio-cni do.
USER 1337:1337
ENTRYPOINT ["/usr/local/bin/meshnode"]
