/* A small TCP echo server: one process, one client at a time is plenty for a health check. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

int main(int argc, char **argv) {
    const char *port_text = argc > 1 ? argv[1] : getenv("ECHO_PORT");
    int port = port_text ? atoi(port_text) : 7007;
    signal(SIGPIPE, SIG_IGN);

    int server = socket(AF_INET, SOCK_STREAM, 0);
    if (server < 0) { perror("echo: socket"); return 1; }
    int one = 1;
    setsockopt(server, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in address;
    memset(&address, 0, sizeof address);
    address.sin_family = AF_INET;
    address.sin_addr.s_addr = htonl(INADDR_ANY);
    address.sin_port = htons((unsigned short)port);
    if (bind(server, (struct sockaddr *)&address, sizeof address) < 0) { perror("echo: bind"); return 1; }
    if (listen(server, 16) < 0) { perror("echo: listen"); return 1; }
    printf("echo: listening on port %d\n", port);
    fflush(stdout);

    for (;;) {
        int client = accept(server, NULL, NULL);
        if (client < 0) continue;
        char buffer[4096];
        ssize_t n;
        while ((n = read(client, buffer, sizeof buffer)) > 0) {
            if (write(client, buffer, (size_t)n) != n) break;
        }
        close(client);
    }
}
