# Orthanc (Debian's package) for tests/test_orthanc.py; its systemd service is not used.
command -v Orthanc >/dev/null || apt_install orthanc
# The DICOMweb plugin, for the sync tests (tests/orthanc_dicomweb.py); iproute2 for their network namespace.
[ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || apt_install orthanc-dicomweb
command -v ip >/dev/null || apt_install iproute2
