"""Example models shipped with deformcli."""
