use super::*;

fn exchange() -> Exchange {
    Exchange {
        world: 4,
        connector: 1,
        acceptor: 2,
        connector_challenge: [7u8; CHALLENGE_LEN],
        acceptor_challenge: [9u8; CHALLENGE_LEN],
    }
}

#[test]
fn a_tag_verifies_under_the_same_token_and_exchange() {
    let key = RingKey::from_token("t0ken");
    let again = RingKey::from_token("t0ken");
    for role in [Role::Connector, Role::Acceptor] {
        let tag = key.tag(role, &exchange());
        assert!(again.verify(role, &exchange(), &tag), "{role:?}");
    }
}

#[test]
fn a_tag_fails_under_another_token() {
    let tag = RingKey::from_token("t0ken").tag(Role::Connector, &exchange());
    for other in ["t0keN", "t0ke", "t0ken ", ""] {
        let key = RingKey::from_token(other);
        assert!(!key.verify(Role::Connector, &exchange(), &tag), "{other:?}");
    }
}

#[test]
fn a_tag_covers_every_field_and_the_role() {
    let key = RingKey::from_token("t0ken");
    let tag = key.tag(Role::Connector, &exchange());
    // The other side's role: an answer cannot be reflected back.
    assert!(!key.verify(Role::Acceptor, &exchange(), &tag));
    let changes: [fn(&mut Exchange); 5] = [
        |e| e.world = 5,
        |e| e.connector = 0,
        |e| e.acceptor = 3,
        |e| e.connector_challenge[31] ^= 1,
        |e| e.acceptor_challenge[0] ^= 0x80,
    ];
    for (i, change) in changes.iter().enumerate() {
        let mut other = exchange();
        change(&mut other);
        assert!(!key.verify(Role::Connector, &other, &tag), "change {i}");
    }
}

#[test]
fn any_flipped_bit_or_a_short_tag_fails() {
    let key = RingKey::from_token("t0ken");
    let tag = key.tag(Role::Acceptor, &exchange());
    for bit in 0..TAG_LEN * 8 {
        let mut bad = tag;
        bad[bit / 8] ^= 1 << (bit % 8);
        assert!(!key.verify(Role::Acceptor, &exchange(), &bad), "bit {bit}");
    }
    assert!(!key.verify(Role::Acceptor, &exchange(), &tag[..TAG_LEN - 1]));
    assert!(!key.verify(Role::Acceptor, &exchange(), &[]));
    assert!(!key.verify(Role::Acceptor, &exchange(), &[0u8; TAG_LEN]));
}

#[test]
fn the_key_is_not_the_token_and_is_never_printed() {
    // A token of exactly 32 bytes could otherwise have been used as the key itself.
    let token = "0123456789abcdef0123456789abcdef";
    let key = RingKey::from_token(token);
    assert_ne!(&key.0[..], token.as_bytes());
    // The derivation is HMAC-SHA256(token, label), pinned by an independent computation
    // (openssl dgst -sha256 -hmac TOKEN over the label).
    assert_eq!(
        hex(&key.0),
        "6d1e368a93540f42419ac16fc96c72e2cd36060c9da0fe9da3f6f7728ca2544a"
    );
    let shown = format!("{key:?}");
    assert_eq!(shown, "RingKey(<redacted>)");
}

#[test]
fn tags_are_hmac_sha256_over_the_documented_layout() {
    // Computed apart (Python's hmac) from the layout in the module header: label, role byte,
    // world, connector rank, acceptor rank (u32 little-endian), both challenges.
    let key = RingKey::from_token("0123456789abcdef0123456789abcdef");
    let expected = [
        (
            Role::Connector,
            "2467c40f97831047c27bf8f16e855df39b144062b16be6de05cee391f9906b3e",
        ),
        (
            Role::Acceptor,
            "01f18e8508f68d48b72e649bdb8754ab1b745d2b23948132de477b58f3408660",
        ),
    ];
    for (role, want) in expected {
        assert_eq!(hex(&key.tag(role, &exchange())), want, "{role:?}");
    }
}

#[test]
fn challenges_are_fresh() {
    let a = Hello::fresh(0, 2).unwrap();
    let b = Hello::fresh(0, 2).unwrap();
    assert_ne!(a.challenge, b.challenge);
    assert_ne!(a.challenge, [0u8; CHALLENGE_LEN]);
}

#[test]
fn a_hello_round_trips_through_its_bytes() {
    let hello = Hello {
        rank: 3,
        world: 5,
        challenge: [0xab; CHALLENGE_LEN],
    };
    let bytes = hello.to_bytes();
    assert_eq!(&bytes[..8], b"XKDRING2");
    assert_eq!(&bytes[8..16], &[3, 0, 0, 0, 5, 0, 0, 0]);
    assert_eq!(&bytes[16..], &[0xab; CHALLENGE_LEN]);
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
