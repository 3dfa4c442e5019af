"""A local, offline stand-in for the part of the Hugging Face Hub HTTP API that `huggingface_hub` uses.

Tests and the local demo push models and load datasets through the *real* `huggingface_hub` client (and
`datasets`), so what is exercised is the code that talks to huggingface.co in production. The server keeps
git-like state on disk: repos (models, datasets, spaces) with branches, PR refs and immutable commits (sha1 ids),
plus one content-addressed object store (sha256) shared by regular and LFS files.

Routes (``{kinds}`` is models|datasets|spaces, ``{repo}`` is ns/name, git-style URLs prefix datasets/ or spaces/):
GET /api/whoami-v2; POST /api/repos/create; DELETE /api/repos/delete; POST /api/validate-yaml;
GET /api/{kinds}/{repo}[/revision/{rev}]; GET .../tree/{rev}[/{path}]; POST .../paths-info/{rev};
GET .../refs; GET .../commits/{rev}; POST|DELETE .../branch/{name}; POST .../tag/{rev}; DELETE .../tag/{name};
POST .../preupload/{rev}; PUT .../settings; POST .../user-access-request/grant; GET .../auth-check[/write];
POST .../commit/{rev} (NDJSON); POST /{repo}.git/info/lfs/objects/batch and .../verify; PUT /lfs-upload/{sha256}
(signed URL); GET|HEAD /{repo}/resolve/{rev}/{path} (with Range). `LocalHub.requests` logs every request answered.

Permissions are huggingface.co's (access.py): tokens of a user with a role (read, write, fine-grained), users in
organizations with a role; writing into a namespace needs write rights there (else 403), private repos are
invisible to anyone but their namespace's users (404), a gated repo's files answer 403 GatedRepo to users not
granted access. So tests meet the refusals a user would.

Clients need ``HF_HUB_DISABLE_XET=1`` (uploads otherwise go through Xet storage, which this server does not speak)
and offline mode off; pass the endpoint explicitly (``HfApi(endpoint=hub.url)``) or set ``HF_ENDPOINT`` before
`huggingface_hub` is imported.

Modules: store (repos, commits and objects on disk), access (tokens, organizations, who may do what),
gitattributes (the LFS and ignore globs), handler (the HTTP plumbing and route table), repos and content (the
routes), server (LocalHub); ``python -m dpo_dev.hub`` serves one.
"""

from .access import HubToken, RefusalAccounts
from .handler import HubRequest
from .server import LocalHub
from .store import HubError

__all__ = ["HubError", "HubRequest", "HubToken", "LocalHub", "RefusalAccounts"]
