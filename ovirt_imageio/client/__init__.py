"""
ovirt_imageio.client: upload and download disk images to and from an
imageio server, with the API of upstream ovirt-imageio 2.5.1's client.

Public names are those below; the modules of this package are private,
except remote (RemoteImage, also the proxy's backend).
"""

from ovirt_imageio import version as _version

from ._api import (
    BUFFER_SIZE,
    MAX_WORKERS,
    DirtyExtent,
    ImageioClient,
    ZeroExtent,
    check_source,
    checksum,
    download,
    extents,
    info,
    measure,
    open_url,
    upload,
)
from .progress import ProgressBar
from .sources import UnsafeImage
from .transfer import ChecksumMismatch, Retry, TransferError

__all__ = (
    "BUFFER_SIZE",
    "MAX_WORKERS",
    "ChecksumMismatch",
    "DirtyExtent",
    "ImageioClient",
    "ProgressBar",
    "Retry",
    "TransferError",
    "UnsafeImage",
    "ZeroExtent",
    "check_source",
    "checksum",
    "download",
    "extents",
    "info",
    "measure",
    "open_url",
    "upload",
)

__version__ = _version.string
