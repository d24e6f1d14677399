//! Join-token parsing: never panics, and what parses prints back to the same token.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_control::token::Token;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(token) = Token::parse(text) {
        let printed = token.to_string();
        assert_eq!(printed, text.trim());
        assert_eq!(Token::parse(&printed), Ok(token));
    }
});
