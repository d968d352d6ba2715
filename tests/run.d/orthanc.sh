# Orthanc (Debian's package) for tests/test_orthanc.py; its systemd service is not used.
command -v Orthanc >/dev/null || apt_install orthanc
