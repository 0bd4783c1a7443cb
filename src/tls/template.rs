//! rcgen parameters written the way Go's `crypto/x509` writes them, for the certificates derpd
//! generates as derper does (the meta-cert and the self-signed IP certificate): the Subject,
//! the validity and a BasicConstraints without the extras rcgen would add.

use std::time::{SystemTime, UNIX_EPOCH};

use rcgen::{CertificateParams, CustomExtension, DistinguishedName, DnType, DnValue, IsCa};

const OID_BASIC_CONSTRAINTS: &[u64] = &[2, 5, 29, 19];

/// Makes BasicConstraints(CA=false) the only CA-related extension, as Go writes it for a non-CA
/// template with `BasicConstraintsValid`. rcgen's `IsCa::ExplicitNoCa` would also add a
/// SubjectKeyIdentifier, which Go only adds for CAs, so we write the extension ourselves:
/// critical, value `SEQUENCE {}` (Go omits the default `cA FALSE` and `pathLen -1`).
pub(super) fn no_ca_only_basic_constraints(params: &mut CertificateParams) {
    params.is_ca = IsCa::NoCa;
    params.use_authority_key_identifier_extension = false;
    let mut bc = CustomExtension::from_oid_content(OID_BASIC_CONSTRAINTS, vec![0x30, 0x00]);
    bc.set_criticality(true);
    params.custom_extensions.push(bc);
}

/// A Subject with only a CommonName, encoded as PrintableString when possible like Go does.
pub(super) fn common_name(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    match cn.try_into() {
        Ok(printable) => dn.push(DnType::CommonName, DnValue::PrintableString(printable)),
        Err(_) => dn.push(DnType::CommonName, DnValue::Utf8String(cn.to_owned())),
    }
    dn
}

/// Valid from `not_before` to `not_after`.
pub(super) fn set_validity(
    params: &mut CertificateParams,
    not_before: SystemTime,
    not_after: SystemTime,
) {
    // Epoch-plus-duration avoids depending on the `time` crate's optional `std` feature.
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    params.not_before = epoch + not_before.duration_since(UNIX_EPOCH).unwrap_or_default();
    params.not_after = epoch + not_after.duration_since(UNIX_EPOCH).unwrap_or_default();
}
