//! clickgate-controlplane
