"""How the model repository reaches the pod: baked into an image, on a volume, or in object storage.

- `image`: a Dockerfile FROM the NGC Triton image with the shipped model folders copied to /models;
  the Deployment runs that image.
- `pvc`: a PersistentVolumeClaim that a one-shot Job fills from that same image (into a folder named
  after the content, so a rollout never reads a half-copied repository); the Deployment runs the stock
  NGC image with the volume mounted read-only.
- an object-store URL (`s3://`, `gs://`, `as://`, in Triton's own forms): Triton reads the repository
  itself. Credentials only by reference: a Secret's name (its keys become the variables Triton's
  cloud clients read) or a ServiceAccount for workload identity; a URL that carries a credential is
  refused.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from cnnpack.errors import UserInputError, shell
from cnnpack.triton_publish import STAGING_PREFIX

MODES = ("image", "pvc")
SCHEMES = ("s3", "gs", "as")
MOUNT = "/models"  # where the repository is inside the container (image and pvc)
GCS_KEY = "gcloud-application-credentials.json"  # the Secret key KServe also reads for GCS
GCS_DIR = "/var/run/secrets/cnnpack-gcs"

# Secret keys -> the variables Triton's cloud clients read. The key names are KServe's, so one Secret
# serves the Deployment and the InferenceService.
SECRET_ENV = {
    "s3": {"AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY",
           "AWS_DEFAULT_REGION": "AWS_DEFAULT_REGION", "AWS_SESSION_TOKEN": "AWS_SESSION_TOKEN"},
    "as": {"AZURE_STORAGE_ACCOUNT": "AZURE_STORAGE_ACCOUNT", "AZURE_STORAGE_KEY": "AZURE_STORAGE_ACCESS_KEY"},
}
# AZURE_STORAGE_ACCOUNT: Triton takes the account from the as:// URL where it is unset, and KServe's Azure Secret has
# no such key (one Secret serves both: a required key it lacks stops the pod at CreateContainerConfigError)
OPTIONAL_KEYS = {"AWS_DEFAULT_REGION", "AWS_SESSION_TOKEN", "AZURE_STORAGE_ACCOUNT"}

_USERINFO = re.compile(r"://[^/?#]*@")  # scheme://user[:password]@host
# a query parameter whose name speaks of a signature, token, key, secret, password or credential (presigned
# S3/GCS URLs: X-Amz-Signature, X-Goog-Credential; Azure SAS: sig=)
_CREDENTIAL_QUERY = re.compile(r"(?i)(^|[?&;])[^=&;]*(sig|token|key|secret|passw|credential|x-amz-|x-goog-)[^=&;]*=")
_ACCESS_KEY_ID = re.compile(r"(?<![A-Z0-9])(AKIA|ASIA)[A-Z0-9]{16}(?![A-Z0-9])")
_IMAGE_REF = re.compile(r"^(?:[a-zA-Z0-9.-]+(?::\d+)?/)?[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
                        r"(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(?:@sha256:[0-9a-f]{64})?$")
NAME_MAX = 255  # the distribution spec's limit on an image name (registry and path, without the tag)


@dataclass(frozen=True)
class Store:
    """Where Triton finds the repository: `image`, `pvc`, or an object-store URL."""

    mode: str  # image | pvc | s3 | gs | as
    url: str | None = None

    @property
    def remote(self) -> bool:
        return self.mode in SCHEMES


def parse(text: str) -> Store:
    """`--model-store`: image | pvc | s3://... | gs://... | as://...; UserInputError for anything else."""
    if text in MODES:
        return Store(text)
    if bad := [c for c in text if not c.isprintable()]:  # a newline, a tab: spaces are fine (one argv element)
        raise UserInputError(f"--model-store {text!r} holds {bad[0]!r}: a control character would reach Triton's "
                             "--model-repository as it is")
    scheme = text.split("://", 1)[0] if "://" in text else ""
    if scheme not in SCHEMES:
        raise UserInputError(f"--model-store {text!r}: use image, pvc, or an object-store URL that Triton reads: "
                             "s3://bucket/path, gs://bucket/path or as://account/container/path")
    check_no_credentials(text)
    rest = text.split("://", 1)[1].strip("/")
    if not rest or (scheme == "as" and rest.count("/") < 1):
        raise UserInputError(f"--model-store {text!r} names no bucket/container: e.g. {scheme}://bucket/path"
                             if scheme != "as" else f"--model-store {text!r}: Azure needs as://account/container/path")
    _check_bucket(scheme, rest, text)
    return Store(scheme, text.rstrip("/"))


# the providers' own naming rules: a name outside them fails only in the cluster, as Triton's load error
_BUCKET_RULES = {
    # S3 also has legacy buckets (us-east-1, before 2018) with capitals and underscores, which Triton's client
    # reaches by path-style addressing: refused here are names no bucket has (a space, a slash, 2 or 256 characters)
    "s3": (re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{1,253}[A-Za-z0-9]$"), "an S3 bucket name (3-255 letters, "
                                                                          "digits, dots, hyphens and underscores, a "
                                                                          "letter or digit at each end)"),
    "gs": (re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$"), "a Cloud Storage bucket name (3-63 lowercase "
                                                                "letters, digits, dots, hyphens and underscores, up "
                                                                "to 222 with dots, a letter or digit at each end)"),
    "account": (re.compile(r"^[a-z0-9]{3,24}$"), "an Azure storage account name (3-24 lowercase letters and digits)"),
    "as": (re.compile(r"^(?:[a-z0-9](?:[a-z0-9]|-(?=[a-z0-9])){2,62}|\$root|\$web)$"),
           "an Azure container name (3-63 lowercase letters, digits and single hyphens, or $root or $web)"),
}


def _check_bucket(scheme: str, rest: str, text: str) -> None:
    parts = rest.split("/")
    if scheme == "s3":  # s3://[http(s)://]host:port/bucket/path names an endpoint first
        endpoint = re.match(r"^https?:/+", rest) or ":" in parts[0]
        parts = re.sub(r"^https?:/+", "", rest).split("/")[1:] if endpoint else parts
        if not parts or not parts[0]:
            raise UserInputError(f"--model-store {text!r} names an endpoint but no bucket: e.g. "
                                 "s3://host:port/bucket/path")
    named = [("account", parts[0]), ("as", parts[1])] if scheme == "as" else [(scheme, parts[0])]
    for rule, name in named:
        pattern, what = _BUCKET_RULES[rule]
        if not pattern.fullmatch(name) or (rule == "s3" and (".." in name or re.match(r"^\d+\.\d+\.\d+\.\d+$", name))):
            raise UserInputError(f"--model-store {text!r}: {name!r} is not {what}")


def check_no_credentials(url: str) -> None:
    """A key in the URL would end up in the manifests, the pod spec and every log that prints them."""
    fix = ("credentials go by reference only: store them in a Secret and pass --credentials-secret NAME, "
           "or use workload identity with --service-account NAME")
    if _USERINFO.search(url):
        raise UserInputError(f"--model-store URL carries credentials (user:password@); {fix}")
    if _ACCESS_KEY_ID.search(url):
        raise UserInputError(f"--model-store URL carries an AWS access key id; {fix}")
    query = re.split(r"[?#]", url, maxsplit=1)[1] if re.search(r"[?#]", url) else ""
    if query and _CREDENTIAL_QUERY.search("?" + query):
        raise UserInputError(f"--model-store URL carries a signature or key in its query string; {fix}")
    if query:
        raise UserInputError(f"--model-store URL has a query string ({query!r}); Triton's repository path takes none")


def check_image(ref: str) -> str:
    # fullmatch: `$` also matches before a trailing newline, which went into every manifest
    if not _IMAGE_REF.fullmatch(ref):
        raise UserInputError(f"--image {ref!r} is not an image reference: [registry[:port]/]name[:tag], "
                             "lowercase name, e.g. registry.example.com/team/cnn:1")
    name = ref.split("@")[0]
    if ":" in name.rsplit("/", 1)[-1]:  # the tag (a colon before the last slash is the registry's port)
        name = name.rsplit(":", 1)[0]
    if len(name) > NAME_MAX:
        raise UserInputError(f"--image names an image of {len(name)} characters (registry and path, without the tag); "
                             f"registries take at most {NAME_MAX}")
    return ref


def has_tag(ref: str) -> bool:
    return "@" in ref or ":" in ref.rsplit("/", 1)[-1]


# -- what the pod needs for each way -------------------------------------------------------------------------
def credentials(store: Store, secret: str | None) -> tuple[list[dict], list[dict], list[dict]]:
    """(env, volumes, volumeMounts) that hand the Secret to Triton's cloud client, by reference only."""
    if not (store.remote and secret):
        return [], [], []
    if store.mode == "gs":  # Triton's GCS client reads a key file
        return ([{"name": "GOOGLE_APPLICATION_CREDENTIALS", "value": f"{GCS_DIR}/{GCS_KEY}"}],
                [{"name": "gcs-credentials", "secret": {"secretName": secret, "items": [{"key": GCS_KEY, "path": GCS_KEY}]}}],
                [{"name": "gcs-credentials", "mountPath": GCS_DIR, "readOnly": True}])
    env = [{"name": var, "valueFrom": {"secretKeyRef": {"name": secret, "key": key,
                                                        **({"optional": True} if key in OPTIONAL_KEYS else {})}}}
           for var, key in SECRET_ENV[store.mode].items()]
    return env, [], []


EARLIER_KEPT = 2  # contents the volume keeps besides the one copied in (`kube.pvc` sizes the claim for them all)


def fill_script(tag: str) -> str:
    """The fill Job's shell: first remove other contents' unfinished copies and all but the EARLIER_KEPT newest other
    contents (folders named as content tags are: nothing else on the volume), then copy /models into <volume>/<tag>
    once, made writable (a read-only folder in the image could not be pruned later), and published by a rename.

    Pruned first, the volume holds at most EARLIER_KEPT + 1 contents and a copy under way: pruned after the copy, a
    content more than the claim's room filled the volume, and every retry failed the same way. Two earlier ones, not
    one: "newest" is a folder's time, and a rollback to an older deployment whose Job already ran touches nothing,
    so the content its pods serve may be the older of the two. A content that cannot be removed is said and left:
    pruning never stops the fill."""
    tags = f"[0-9a-f]{{{len(tag)}}}"
    prune = "while read -r old; do chmod -R u+w -- \"$old\" 2>/dev/null || :; rm -rf -- \"$old\" || " \
            "echo \"cnnpack: could not remove $old\" >&2; done"
    return (f"cd /target; ls -1d -- *.partial 2>/dev/null | grep -E '^{tags}[.]partial$' | grep -vx {tag}.partial "
            f"| {prune}; ls -1dt -- * 2>/dev/null | grep -E '^{tags}$' | grep -vx {tag} | tail -n +{EARLIER_KEPT + 1} "
            f"| {prune}; if ! test -d /target/{tag}; then rm -rf /target/{tag}.partial; "
            f"cp -R {MOUNT} /target/{tag}.partial; chmod -R u+w /target/{tag}.partial; "
            f"mv /target/{tag}.partial /target/{tag}; fi; touch /target/{tag}")


def kserve_uri(store: Store, *, image: str, pvc: str, tag: str) -> str:
    """The InferenceService's storageUri for the same repository."""
    if store.mode == "image":
        return f"oci://{image}"  # a KServe modelcar: the image's /models (needs storageInitializer.enableModelcar)
    if store.mode == "pvc":
        return f"pvc://{pvc}/{tag}"
    rest = store.url.split("://", 1)[1]
    if store.mode == "as":  # Triton's as://account/container/path is KServe's blob URL
        account, path = rest.split("/", 1)
        return f"https://{account}.blob.core.windows.net/{path}"
    if store.mode == "s3":  # Triton's s3://[http(s)://]host:port/bucket/path: KServe takes the endpoint from the Secret
        rest = re.sub(r"^https?://", "", rest)
        first, _, after = rest.partition("/")
        if ":" in first and after:
            rest = after
    return f"{store.mode}://{rest}"


def upload_lines(store: Store, repository: str, models: list[str]) -> list[str]:
    """The exact commands that put the shipped model folders where the URL points, without what the image leaves out
    too (deploy/plan.py's shipped_cache: Python's bytecode caches, a killed `cnnpack triton`'s staging folder).
    `az storage blob upload-batch` has no exclusion: its README line says to remove them first."""
    base = store.url.rstrip("/")
    if store.mode == "s3":
        rest = base.split("://", 1)[1]
        scheme = re.match(r"^(https?)://", rest)
        rest = re.sub(r"^https?://", "", rest)
        first, _, after = rest.partition("/")
        endpoint = f" --endpoint-url {scheme.group(1) if scheme else 'http'}://{first}" if ":" in first and after else ""
        target = f"s3://{after}" if endpoint else f"s3://{rest}"
        skip = " ".join(f"--exclude {shell(p)}" for p in ("*__pycache__/*", "*.pyc", f"*{STAGING_PREFIX}*"))
        return [f"aws s3 sync --delete {skip} {shell(f'{repository}/{m}')} {shell(f'{target}/{m}')}{endpoint}"
                for m in models]
    if store.mode == "gs":
        staging = STAGING_PREFIX.replace(".", r"\.")
        skip = shell(rf"(.*/)?(__pycache__/.*|[^/]*\.pyc|{staging}[^/]*/.*)$")  # a Python regex
        return [f"gcloud storage rsync --recursive --delete-unmatched-destination-objects --exclude {skip} "
                f"{shell(f'{repository}/{m}')} {shell(f'{base}/{m}')}" for m in models]
    account, container_path = base.split("://", 1)[1].split("/", 1)
    container, _, prefix = container_path.partition("/")
    return [f"az storage blob upload-batch --overwrite --account-name {shell(account)} "
            f"--destination {shell(container)} --destination-path {shell('/'.join(filter(None, [prefix, m])))} --source {shell(f'{repository}/{m}')}"
            for m in models]
